#!/usr/bin/env bash
# Boots cordon as PID 1 in fresh pid, mount, uts and network namespaces with a demo agent, so you
# can see the boot, the locked-down agent, the egress policy at work and a graceful stop without
# building a container image. Nothing here changes the host: mounts happen in a private mount
# namespace, the network is a namespace pair of the demo's own, and the demo agent user exists
# only in a passwd file bind-mounted there. Needs root. Ctrl-C stops it.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" -eq 0 ] || { echo "demo: run as root (it creates namespaces): sudo make demo" >&2; exit 1; }
bin=${CORDON_BIN:-target/release/cordon}
upstream=${CORDON_UPSTREAM_BIN:-target/release/examples/bench_upstream}
[ -x "$bin" ] && [ -x "$upstream" ] || { echo "demo: not built; run make build" >&2; exit 1; }

# Its own network: a "world" namespace (192.0.2.1) with a synthetic DNS server that answers
# every name, joined by veth to cordon's namespace. The host's network is never touched.
tag=$$; world=demo-w-$tag; inner=demo-c-$tag
dir=$(mktemp -d /var/tmp/cordon-demo.XXXXXX)
cleanup() {
  [ -n "${upstream_pid:-}" ] && kill "$upstream_pid" 2>/dev/null
  ip netns del "$inner" 2>/dev/null; ip netns del "$world" 2>/dev/null
  rm -rf "$dir"
}
trap cleanup EXIT
source scripts/netns-pair.sh
netns_pair "$world" "$inner" "$tag"
ip netns exec "$world" "$upstream" 192.0.2.1:53 >/dev/null 2>&1 &
upstream_pid=$!
echo "nameserver 192.0.2.1" > "$dir/resolv.conf"
mkdir -p "$dir/home" "$dir/workspace"
cp /etc/passwd "$dir/passwd"; cp /etc/group "$dir/group"
echo "demo-agent:x:4321:4321::$dir/home:/bin/sh" >> "$dir/passwd"
echo "demo-agent:x:4321:" >> "$dir/group"
cat > "$dir/cordon.toml" <<TOML
[secrets]
required = ["DEMO_TOKEN"]

[[tmpfs]]
path = "$dir/workspace"
size = "64M"
owner = "agent"

[[tmpfs]]
path = "~"
size = "64M"
mode = "0700"
owner = "agent"

[network]
allowlist = "$PWD/network/domains.conf"

[agent]
user = "demo-agent"
workdir = "$dir/workspace"
on_exit = "shutdown"
# Headless, so the demo agent's output shows here; in a container the agent runs in tmux and
# operators join it with `cordon attach`.
tmux = false
command = ["/bin/sh", "-c", """
echo; echo '--- demo agent ---'
id
grep -E '^(CapEff|CapBnd|NoNewPrivs)' /proc/self/status
if touch /demo-write 2>/dev/null; then echo 'write to / succeeded?!'; else echo 'write to /: refused (read-only root)'; fi
echo "secret in my environment: \${DEMO_TOKEN:-no}"
echo "allowed name  api.anthropic.com: \$(getent ahostsv4 api.anthropic.com | head -1 | cut -d" " -f1)"
echo "denied name   exfil.example.net: \$(getent hosts exfil.example.net >/dev/null && echo resolved?! || echo NXDOMAIN, never sent upstream)"
echo "outside DNS   dig @192.0.2.1:      \$(dig +short +tries=1 +time=2 @192.0.2.1 example.net 2>&1 | tail -1)"
echo "direct IP     192.0.2.1:443:       \$(timeout 3 bash -c 'exec 3<>/dev/tcp/192.0.2.1/443' 2>&1 | sed 's/.*: //' | tail -1)"
echo 'agent running; press Ctrl-C for a graceful stop'
trap 'echo agent: got SIGTERM, exiting; exit 0' TERM
while :; do sleep 1; done
"""]

[supervisor]
stop_grace = "5s"
TOML

echo "demo: booting cordon as PID 1 (config $dir/cordon.toml)"
DEMO_TOKEN=demo-secret-value ip netns exec "$inner" unshare --pid --fork --mount --uts --mount-proc --propagation private -- \
  /bin/sh -c "mount -t tmpfs -o size=16m tmpfs /run && mount --bind $dir/passwd /etc/passwd && mount --bind $dir/group /etc/group && mount --bind $dir/resolv.conf /etc/resolv.conf && exec $bin init --config $dir/cordon.toml" \
  || status=$?
echo "demo: cordon exited with status ${status:-0}"
