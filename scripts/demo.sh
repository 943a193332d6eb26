#!/usr/bin/env bash
# Boots cordon as PID 1 in fresh pid, mount and uts namespaces with a demo agent, so you can see
# the boot, the locked-down agent and a graceful stop without building a container image.
# Nothing here changes the host: mounts happen in the private mount namespace, and the demo
# agent user exists only in a passwd file bind-mounted there. Needs root. Ctrl-C stops it.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" -eq 0 ] || { echo "demo: run as root (it creates namespaces): sudo make demo" >&2; exit 1; }
bin=${CORDON_BIN:-target/release/cordon}
[ -x "$bin" ] || { echo "demo: $bin not built; run make build" >&2; exit 1; }

dir=$(mktemp -d /var/tmp/cordon-demo.XXXXXX)
trap 'rm -rf "$dir"' EXIT
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
command = ["/bin/sh", "-c", """
echo; echo '--- demo agent ---'
id
grep -E '^(CapEff|CapBnd|NoNewPrivs)' /proc/self/status
if touch /demo-write 2>/dev/null; then echo 'write to / succeeded?!'; else echo 'write to /: refused (read-only root)'; fi
echo "secret in my environment: \${DEMO_TOKEN:-no}"
echo 'agent running; press Ctrl-C for a graceful stop'
trap 'echo agent: got SIGTERM, exiting; exit 0' TERM
while :; do sleep 1; done
"""]

[supervisor]
stop_grace = "5s"
TOML

echo "demo: booting cordon as PID 1 (config $dir/cordon.toml)"
DEMO_TOKEN=demo-secret-value unshare --pid --fork --mount --uts --mount-proc --propagation private -- \
  /bin/sh -c "mount -t tmpfs -o size=16m tmpfs /run && mount --bind $dir/passwd /etc/passwd && mount --bind $dir/group /etc/group && exec $bin init --config $dir/cordon.toml" \
  || status=$?
echo "demo: cordon exited with status ${status:-0}"
