# cordon's container image: a Debian bookworm runtime with tmux, git, iptables/ipset, gh and
# (optionally) Claude Code, cordon as ENTRYPOINT. Build it with scripts/build-image.sh, which
# also works where no registry is reachable (a debootstrapped base, a host-built binary).
#
#   BASE            runtime base image (default debian:bookworm-slim; the script can make one)
#   BUILDER         image the binary stage runs in (default rust:1.95-bookworm)
#   BINARY_FROM     "source" compiles cordon in BUILDER; "prebuilt" copies target/image/cordon
#                   (then BUILDER can be BASE: no Rust image needed)
#   CLAUDE_CODE     npm version of @anthropic-ai/claude-code to install; empty for none
#   IPTABLES        "nft" (Debian's default) or "legacy", for kernels without nf_tables support
# An extra CA certificate (a TLS-intercepting proxy's) is trusted in the build and the image
# when the context holds target/image/extra-ca.crt (scripts/build-image.sh EXTRA_CA_CERT=...).
# (One builder stage for both cases: the classic builder builds every stage.)
ARG BASE=debian:bookworm-slim
ARG BUILDER=rust:1.95-bookworm

FROM ${BUILDER} AS binary
ARG BINARY_FROM=source
WORKDIR /src
COPY . .
RUN if [ "$BINARY_FROM" = prebuilt ]; then cp target/image/cordon /cordon; \
    else cargo build --release --locked --bin cordon && cp target/release/cordon /cordon; fi; \
    mkdir /extra-ca; if [ -f target/image/extra-ca.crt ]; then cp target/image/extra-ca.crt /extra-ca/; fi

FROM ${BASE}
ARG CLAUDE_CODE=
ARG IPTABLES=nft
ENV LANG=C.UTF-8
COPY --from=binary /extra-ca/ /usr/local/share/ca-certificates/
RUN set -eux; \
    apt-get update; \
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        bash ca-certificates curl git gh iproute2 ipset iptables jq less procps tmux; \
    if [ -n "$CLAUDE_CODE" ]; then \
        DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends nodejs npm; \
        NODE_EXTRA_CA_CERTS=/etc/ssl/certs/ca-certificates.crt \
            npm install -g --no-fund --no-audit "@anthropic-ai/claude-code@${CLAUDE_CODE}"; \
        npm cache clean --force; \
    fi; \
    if [ "$IPTABLES" = legacy ]; then \
        update-alternatives --set iptables /usr/sbin/iptables-legacy; \
        update-alternatives --set ip6tables /usr/sbin/ip6tables-legacy; \
    fi; \
    rm -rf /var/lib/apt/lists/*; \
    useradd --create-home --uid 1000 --shell /bin/bash agent; \
    mkdir -p /workspace /etc/cordon
COPY --from=binary /cordon /usr/local/bin/cordon
COPY config/cordon.toml config/tmux.conf config/claude-settings.json config/demo.toml /etc/cordon/
COPY config/demo-agent.sh /usr/local/share/cordon/demo-agent
# Claude Code's status line and session-naming Stop hook, referenced by claude-settings.json
# (kept in the agent's settings only when [claude] turns them on). jq above is theirs.
COPY config/claude-statusline.sh config/claude-name-session.sh /usr/local/lib/cordon/
COPY network/domains.conf /etc/cordon/domains.conf
# An interactive root shell (docker exec -it ... bash, fly ssh console) joins the agent's
# session; when that is not possible it says why and leaves the root shell usable.
RUN printf '%s\n' '# cordon: join the agent session on interactive logins' \
        'if [ -t 0 ] && [ -z "${CORDON_NO_ATTACH:-}" ]; then cordon attach || echo "(cordon attach failed; this is a root shell. cordon status tells more)"; fi' \
        >> /root/.bashrc
HEALTHCHECK --interval=30s --timeout=10s --start-period=5m CMD ["/usr/local/bin/cordon", "status"]
ENTRYPOINT ["/usr/local/bin/cordon"]
