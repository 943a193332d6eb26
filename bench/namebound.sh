#!/usr/bin/env bash
# The name-bound egress layer (issue 12) measured from both sides in one run: the agent's uid,
# whose TLS connections the kernel redirects through cordon's name-checking proxy, against root,
# whose connections go straight out, with the same client to the same server. Everything runs in
# private network namespaces on documentation addresses (nothing leaves this machine): a world
# namespace serves TLS at 198.51.100.1, and the real cordon runs as PID 1 of its own pid/mount
# namespaces with the world behind its veth. Prints a markdown report; see docs/benchmarks.md.
#   sudo bash bench/namebound.sh            # add --perf to also profile the proxy during 1 GB
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" -eq 0 ] || { echo "bench: run as root (namespaces, iptables in them)" >&2; exit 1; }
for tool in openssl curl /usr/bin/python3 ip unshare nsenter dig; do
  command -v "$tool" >/dev/null || { echo "bench: needs $tool (apt-get install openssl curl python3 iproute2 util-linux bind9-dnsutils)" >&2; exit 1; }
done
profile=false; [ "${1:-}" = "--perf" ] && profile=true
# How many connections for the latency percentiles and the idle-memory figure.
rounds=10; per_round=100; idle=1000
bin=$PWD/target/release
if command -v cargo >/dev/null; then
  cargo build --release --quiet --bin cordon --examples   # a no-op when up to date
fi
[ -x "$bin/cordon" ] && [ -x "$bin/examples/bench_upstream" ] ||
  { echo "bench: $bin/cordon or examples/bench_upstream missing: cargo build --release --bin cordon --examples" >&2; exit 1; }

tag=$$; world=nw-$tag; inner=nc-$tag
dir=$(mktemp -d /var/tmp/cordon-nbench.XXXXXX)
chmod 755 "$dir"   # the agent's uid reads the client script here
pids=()
source scripts/netns-pair.sh
cleanup() { netns_teardown "$world" "$inner" "$dir" "${pids[@]}"; }
trap cleanup EXIT

# Network: world 192.0.2.1 (DNS) and 198.51.100.1 (the TLS server), cordon's side 192.0.2.2.
netns_pair "$world" "$inner" "$tag"
ip -n "$world" addr add 198.51.100.1/24 dev "vw$tag"
server=198.51.100.1; name=tls.bench.test   # bench_upstream answers tls.bench.test A 198.51.100.1
ip netns exec "$world" "$bin/examples/bench_upstream" 192.0.2.1:53 >/dev/null 2>&1 & pids+=($!)

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 -subj "/CN=$name" \
  -addext "subjectAltName=DNS:$name" -keyout "$dir/key.pem" -out "$dir/cert.pem" 2>/dev/null

# The world's servers. :443 is `openssl s_server -WWW` (C; one connection at a time, which the
# sequential latency client and a single download need) serving a 1 GiB file of zeros from a
# tmpfs of its own private mount namespace. :8443 holds many idle connections open (asyncio).
cat > "$dir/idle_server.py" <<'PY'
import asyncio, resource, ssl, sys
resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)
cert, key, host, port = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
async def hold(reader, writer):
    try:
        while await reader.read(4096):
            pass
    except OSError:
        pass
    writer.close()
async def main():
    srv = await asyncio.start_server(hold, host, port, ssl=ctx, backlog=1024)
    await srv.serve_forever()
asyncio.run(main())
PY
mkdir -p "$dir/www" "$dir/run"; chmod 1777 "$dir/run"   # run: the clients' files, any uid
ip netns exec "$world" unshare --mount --propagation private -- /bin/sh -c \
  "mount -t tmpfs -o size=1100m tmpfs $dir/www &&
   head -c 1073741824 /dev/zero > $dir/www/zero.bin && cd $dir/www &&
   exec openssl s_server -quiet -WWW -accept $server:443 -cert $dir/cert.pem -key $dir/key.pem" \
  >/dev/null 2> "$dir/s_server.log" & pids+=($!)
ip netns exec "$world" /usr/bin/python3 "$dir/idle_server.py" "$dir/cert.pem" "$dir/key.pem" "$server" 8443 \
  >/dev/null 2> "$dir/idle_server.log" & pids+=($!)

# cordon as PID 1 of its own pid/mount namespaces, with an agent that only sleeps. The
# allowlist names the server on 443 (a default port) and 8443 (name-checked too).
cp /etc/passwd "$dir/passwd"; cp /etc/group "$dir/group"
echo "benchagent:x:4343:4343::$dir/home:/bin/sh" >> "$dir/passwd"; echo "benchagent:x:4343:" >> "$dir/group"
echo "nameserver 192.0.2.1" > "$dir/resolv.conf"
mkdir -p "$dir/home" "$dir/ws"
printf '%s\n' "$name" "$name:8443" > "$dir/domains.conf"
cat > "$dir/cordon.toml" <<TOML
[secrets]
required = []
[[tmpfs]]
path = "$dir/ws"
size = "16M"
owner = "agent"
[filesystem]
readonly_root = false
[network]
allowlist = "$dir/domains.conf"
[agent]
user = "benchagent"
workdir = "$dir/ws"
command = ["/bin/sleep", "100000"]
tmux = false
TOML
ip netns exec "$inner" unshare --pid --fork --mount --mount-proc --propagation private -- /bin/sh -c \
  "mount -t tmpfs tmpfs /run && mount --bind $dir/passwd /etc/passwd && mount --bind $dir/group /etc/group && mount --bind $dir/resolv.conf /etc/resolv.conf && exec $bin/cordon init --config $dir/cordon.toml" \
  >/dev/null 2> "$dir/cordon.log" & pids+=($!)
unshare_pid=${pids[-1]}

for _ in $(seq 150); do
  listening=$(ip netns exec "$world" ss -Hltn "( sport = :443 or sport = :8443 )" | wc -l)
  grep -q "ready" "$dir/cordon.log" && [ "$listening" -eq 2 ] && break
  sleep 0.2
done
grep -q "ready" "$dir/cordon.log" || { echo "bench: cordon did not become ready:" >&2; cat "$dir/cordon.log" >&2; exit 1; }
[ "$listening" -eq 2 ] || { echo "bench: the world's TLS servers did not start:" >&2; cat "$dir"/*server.log >&2; exit 1; }
reaper=$(awk '{print $1}' /proc/"$unshare_pid"/task/*/children)
supervisor=$(for p in $(cat /proc/"$reaper"/task/*/children); do grep -q supervise /proc/"$p"/cmdline && echo "$p"; done)
[ -n "$supervisor" ] || { echo "bench: no supervisor under cordon's reaper $reaper" >&2; exit 1; }
as_agent() { nsenter -t "$reaper" -p -m -n -S 4343 -G 4343 -- "$@"; }
as_root() { nsenter -t "$reaper" -p -m -n -- "$@"; }

# The client, the same for both uids. hs: N sequential connect+handshake times in µs, one a line.
# idle: opens N TLS connections, writes how many it holds to FILE, holds them until STOP exists
# (at most 300 s). sni: one handshake with the given SNI, prints ok or the error's name.
cat > "$dir/client.py" <<'PY'
import os, resource, socket, ssl, sys, time
resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)
mode, addr, port, name = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.check_hostname = False
ctx.verify_mode = ssl.CERT_NONE
def handshake():
    s = socket.create_connection((addr, port), timeout=10)
    return ctx.wrap_socket(s, server_hostname=name)
if mode == "hs":
    out = []
    for _ in range(int(sys.argv[5])):
        t0 = time.perf_counter_ns()
        s = handshake()
        out.append((time.perf_counter_ns() - t0) / 1000)
        s.close()
    print("\n".join("%.1f" % t for t in out))
elif mode == "idle":
    n, report, stop = int(sys.argv[5]), sys.argv[6], sys.argv[7]
    held = [handshake() for _ in range(n)]
    with open(report, "w") as f:
        f.write("%d\n" % len(held))
    deadline = time.time() + 300
    while not os.path.exists(stop) and time.time() < deadline:
        time.sleep(0.1)
elif mode == "sni":
    try:
        handshake().close()
        print("ok")
    except OSError as e:
        print(type(e).__name__)
PY

# Preconditions: the agent resolves the name through cordon (which admits and binds the address),
# its connection with that name goes through, and one with a foreign SNI is refused: the layer is
# really in the agent's path.
got=$(as_agent dig +short +time=2 +tries=3 @127.0.0.53 "$name" | tail -1)
[ "$got" = "$server" ] || { echo "bench: cordon's DNS answered '$got' for $name, not $server" >&2; exit 1; }
for _ in $(seq 50); do [ "$(as_agent /usr/bin/python3 "$dir/client.py" sni "$server" 443 "$name" 2>&1)" = ok ] && break; sleep 0.2; done
[ "$(as_agent /usr/bin/python3 "$dir/client.py" sni "$server" 443 "$name")" = ok ] || { echo "bench: the agent cannot reach $name" >&2; exit 1; }
foreign=$(as_agent /usr/bin/python3 "$dir/client.py" sni "$server" 443 evil.bench.test)
[ "$foreign" != ok ] || { echo "bench: a foreign SNI got through: the layer is not in the agent's path" >&2; exit 1; }

ticks=$(getconf CLK_TCK)
cpu() { awk -v t="$ticks" '{printf "%.3f", ($14 + $15) / t}' /proc/"$1"/stat; }   # utime+stime, s
rss_kib() { awk '/VmRSS/ {print $2}' /proc/"$1"/status; }
fds() { ls /proc/"$1"/fd | wc -l; }
s_server=$(pgrep -f "s_server -quiet -WWW -accept $server:443" | head -1)

# 1. Memory: the supervisor (which runs the proxy) before and with 1,000 idle TLS connections of
# the agent open through it; root's 1,000 are the control. First, because freed relay buffers
# of earlier phases would be reused and hide the cost.
idle_mem() { # who -> "rss_delta_kib fds_delta held"
  local who=$1 before before_fd after after_fd
  rm -f "$dir/run/held" "$dir/run/stop"
  before=$(rss_kib "$supervisor"); before_fd=$(fds "$supervisor")
  "as_$who" timeout 300 /usr/bin/python3 "$dir/client.py" idle "$server" 8443 "$name" "$idle" "$dir/run/held" "$dir/run/stop" &
  local cpid=$!
  for _ in $(seq 1200); do [ -s "$dir/run/held" ] && break; sleep 0.1; done
  sleep 1
  after=$(rss_kib "$supervisor"); after_fd=$(fds "$supervisor")
  touch "$dir/run/stop"; wait "$cpid" || true
  echo "$((after - before)) $((after_fd - before_fd)) $(cat "$dir/run/held" 2>/dev/null || echo 0)"
}
read -r root_mem root_fd root_held <<<"$(idle_mem root)"
rss0=$(rss_kib "$supervisor")
read -r agent_mem agent_fd agent_held <<<"$(idle_mem agent)"
sleep 1; rss_closed=$(rss_kib "$supervisor")

# 2. Connect + TLS handshake latency: rounds of 100 sequential connections per uid, alternating
# which goes first, so the machine's noise falls on both alike; 20 warm-up connections each.
as_agent /usr/bin/python3 "$dir/client.py" hs "$server" 443 "$name" 20 >/dev/null
as_root /usr/bin/python3 "$dir/client.py" hs "$server" 443 "$name" 20 >/dev/null
: > "$dir/hs_agent"; : > "$dir/hs_root"
for r in $(seq "$rounds"); do
  order=$([ $((r % 2)) -eq 1 ] && echo "agent root" || echo "root agent")
  for who in $order; do "as_$who" timeout 300 /usr/bin/python3 "$dir/client.py" hs "$server" 443 "$name" "$per_round" >> "$dir/hs_$who"; done
done
pct() { sort -n "$1" | awk -v p="$2" '{a[NR]=$1} END {i=int((NR*p+99)/100); if (i<1) i=1; printf "%.3f", a[i]/1000}'; }  # ms, nearest rank

# 3. Throughput and CPU: 1 GiB downloaded with curl, twice per uid in the order agent, root,
# root, agent. CPU of the supervisor (the proxy), of curl, and of the server, per GiB.
fetch() { # who -> "bytes_per_s supervisor_s curl_s server_s"
  local who=$1 s0 v0 out
  s0=$(cpu "$supervisor"); v0=$(cpu "$s_server")
  out=$("as_$who" timeout 300 /bin/bash -c "curl -sSk --resolve $name:443:$server https://$name/zero.bin -o /dev/null -w '%{speed_download} %{size_download}\n'; times" 2>&1)
  read -r speed size <<<"$(head -1 <<<"$out")"
  [ "$size" = 1073741824 ] || { echo "bench: $who's download was ${size:-no} bytes: $out" >&2; touch "$dir/failed"; }
  local curl_s
  curl_s=$(tail -1 <<<"$out" | awk '{split($1,u,/[ms]/); split($2,s,/[ms]/); printf "%.3f", u[1]*60+u[2]+s[1]*60+s[2]}')
  echo "$speed $(awk -v a="$s0" -v b="$(cpu "$supervisor")" 'BEGIN {printf "%.3f", b-a}') $curl_s $(awk -v a="$v0" -v b="$(cpu "$s_server")" 'BEGIN {printf "%.3f", b-a}')"
}
if $profile; then
  perf record -g -o "$dir/perf.data" -p "$supervisor" >/dev/null 2>&1 & perf_pid=$!
  sleep 1
  fetch agent >/dev/null
  kill -INT "$perf_pid"; wait "$perf_pid" || true
  { perf report -i "$dir/perf.data" --stdio --no-children -g none --sort dso 2>/dev/null | grep "%" || true
    echo
    perf report -i "$dir/perf.data" --stdio --no-children -g none --sort dso,sym 2>/dev/null | grep "%" | awk "NR <= 25" || true
    echo
    # Inclusive time of the syscalls the relay makes (kernel work done on the proxy's behalf).
    perf report -i "$dir/perf.data" --stdio --children -g none --sort sym 2>/dev/null |
      grep -E "__x64_sys_(sendto|recvfrom|epoll_wait|write|read)\b|net_rx_action|tcp_v4_rcv\b|copy_bidirectional|tcp_recvmsg\b|tcp_sendmsg\b" || true
  } > "$dir/perf.txt"
fi
declare -A tp
for who in agent root root agent; do tp[$who]+="$(fetch "$who");"; done
[ ! -e "$dir/failed" ] || exit 1
avg() { # "a b c d;a b c d;" field -> mean
  tr ';' '\n' <<<"$1" | awk -v f="$2" 'NF {s+=$f; n++} END {printf "%.3f", s/n}'
}

# Report.
ms() { printf "%s ms" "$1"; }
ap50=$(pct "$dir/hs_agent" 50); rp50=$(pct "$dir/hs_root" 50)
ap99=$(pct "$dir/hs_agent" 99); rp99=$(pct "$dir/hs_root" 99)
n_agent=$(wc -l < "$dir/hs_agent"); n_root=$(wc -l < "$dir/hs_root")
a_bps=$(avg "${tp[agent]}" 1); r_bps=$(avg "${tp[root]}" 1)
mib() { awk -v b="$1" 'BEGIN {printf "%.0f MiB/s", b/1048576}'; }
each() { tr ';' '\n' <<<"$1" | awk 'NF {printf "%s%.0f", sep, $1/1048576; sep=", "}'; }
a_sup=$(avg "${tp[agent]}" 2); r_sup=$(avg "${tp[root]}" 2)
a_curl=$(avg "${tp[agent]}" 3); r_curl=$(avg "${tp[root]}" 3)
a_srv=$(avg "${tp[agent]}" 4); r_srv=$(avg "${tp[root]}" 4)
calc() { awk "BEGIN {printf \"$1\", $2}"; }
verdict() { if awk "BEGIN {exit !($1)}"; then echo met; else echo "**missed**"; fi; }
add50=$(calc %.3f "$ap50 - $rp50"); add99=$(calc %.3f "$ap99 - $rp99")
tp_ratio=$(calc %.2f "$a_bps / $r_bps")
per_conn=$(calc %.1f "$agent_mem / $idle")

echo "| measure | agent (through the layer) | root (no layer) | agent/root | added |"
echo "|---|---|---|---|---|"
echo "| connect + TLS handshake p50 ($n_agent / $n_root connections) | $(ms "$ap50") | $(ms "$rp50") | $(calc %.2f "$ap50 / $rp50") | $(ms "$add50") |"
echo "| connect + TLS handshake p99 | $(ms "$ap99") | $(ms "$rp99") | $(calc %.2f "$ap99 / $rp99") | $(ms "$add99") |"
echo "| 1 GiB download (mean of 2; each: $(each "${tp[agent]}") / $(each "${tp[root]}")) | $(mib "$a_bps") | $(mib "$r_bps") | $tp_ratio | |"
echo "| CPU of cordon's supervisor per GiB | $(calc %.2f "$a_sup") s | $(calc %.2f "$r_sup") s | | $(calc %.2f "$a_sup - $r_sup") s |"
echo "| CPU of curl per GiB | $(calc %.2f "$a_curl") s | $(calc %.2f "$r_curl") s | $(calc %.2f "$a_curl / $r_curl") | |"
echo "| CPU of the server per GiB | $(calc %.2f "$a_srv") s | $(calc %.2f "$r_srv") s | $(calc %.2f "$a_srv / $r_srv") | |"
echo "| CPU of all three per GiB | $(calc %.2f "$a_sup + $a_curl + $a_srv") s | $(calc %.2f "$r_sup + $r_curl + $r_srv") s | $(calc %.2f "($a_sup + $a_curl + $a_srv) / ($r_sup + $r_curl + $r_srv)") | |"
echo "| supervisor RSS with $idle idle TLS connections open ($agent_held / $root_held held; supervisor fds +$agent_fd / +$root_fd) | $(printf %+d "$agent_mem") KiB | $(printf %+d "$root_mem") KiB | | $per_conn KiB per connection |"
echo
echo "Supervisor RSS: $rss0 KiB before the agent's idle connections, $rss_closed KiB after they closed."
echo
echo "| target | result | verdict |"
echo "|---|---|---|"
echo "| added handshake latency ≤ 0.5 ms at p50 | $(ms "$add50") | $(verdict "$add50 <= 0.5") |"
echo "| added handshake latency ≤ 2 ms at p99 | $(ms "$add99") | $(verdict "$add99 <= 2") |"
echo "| throughput ≥ 90% of root's | $(calc %.0f "$tp_ratio * 100")% | $(verdict "$tp_ratio >= 0.9") |"
echo "| memory ≤ 20 KiB per idle connection | $per_conn KiB | $(verdict "$per_conn <= 20") |"
if $profile; then
  echo; echo "perf, cordon's supervisor during the agent's 1 GiB download (self time by object and by symbol; then inclusive time of the relay's syscalls):"
  echo '```'; cat "$dir/perf.txt"; echo '```'
fi
