#!/usr/bin/env bash
# cordon's DNS server against dnsmasq, side by side in one run, on loopback in private network
# namespaces (nothing leaves this machine). Both forward the same 1,000-entry allowlist to the
# same synthetic upstream and put the answered addresses into ipset sets; dnsperf sends the
# same query files to each. Prints a markdown report; see docs/benchmarks.md.
#   sudo bash bench/run.sh [seconds-per-run] [--repeat N] [--perf] [--pin]
# Each row measures N pairs (default 3), cordon and dnsmasq alternating (which of the two goes
# first alternates too), and reports each server's median and every pair's ratio. Each round
# also measures the floor (examples/bench_floor, between the two): a server that does no DNS
# work, only the system calls and the kernel's path for each datagram, paced as cordon's loop
# is; its queries/s against dnsmasq's is the most any server could show in that run on that
# machine with that client. 18 × N dnsperf runs of that length, 6 more at fixed rates, plus
# ~1 minute (~12 minutes at the defaults).
# --perf also records cordon's supervisor (perf record -g) during the first of its runs in each
# row and prints the top of each profile.
# Each row also gives each server's CPU time (user + system, every thread) per query answered.
# Then allowed names at fixed rates (500, 2,000 and 10,000 q/s, dnsperf -Q): each server's CPU,
# as a share of one core, and average latency, one run each per rate.
# --pin runs the client and the servers on separate CPUs (taskset): dnsperf on CPU 0 (and any
# beyond the second), each server, all its threads, on CPU 1, instead of leaving them all to
# the scheduler.
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" -eq 0 ] || { echo "bench: run as root (namespaces, ipset)" >&2; exit 1; }
for tool in dnsperf dnsmasq ipset iptables-restore; do
  command -v "$tool" >/dev/null || { echo "bench: needs $tool (apt-get install dnsperf dnsmasq-base ipset iptables)" >&2; exit 1; }
done
secs=10; repeat=3; profile=false; pin=false
while [ $# -gt 0 ]; do
  case $1 in
    --perf) profile=true ;;
    --pin) pin=true ;;
    --repeat) repeat=${2:-}; shift ;;
    --repeat=*) repeat=${1#--repeat=} ;;
    -*) echo "bench: unknown option $1 (usage: bench/run.sh [seconds-per-run] [--repeat N] [--perf] [--pin])" >&2; exit 2 ;;
    *) secs=$1 ;;
  esac
  shift
done
[[ $secs =~ ^[1-9][0-9]*$ ]] || { echo "bench: seconds-per-run must be a whole number of seconds, at least 1 (got '$secs')" >&2; exit 2; }
[[ $repeat =~ ^[1-9][0-9]*$ ]] || { echo "bench: --repeat takes a whole number of pairs, at least 1 (got '$repeat')" >&2; exit 2; }
if $pin && [ "$(nproc)" -lt 2 ]; then echo "bench: --pin needs 2 CPUs" >&2; exit 1; fi
if $pin; then
  command -v taskset >/dev/null || { echo "bench: needs taskset (apt-get install util-linux)" >&2; exit 1; }
  server_cpu=1; client_cpus=0; [ "$(nproc)" -gt 2 ] && client_cpus="0,2-$(( $(nproc) - 1 ))"
  client=(taskset -c "$client_cpus")
else
  client=()
fi
$profile && { command -v perf >/dev/null || { echo "bench: --perf needs perf (apt-get install linux-perf)" >&2; exit 1; }; }
cargo build --release --quiet --bin cordon --examples
bin=$PWD/target/release
tag=$$; world=bw-$tag; inner=bc-$tag
dir=$(mktemp -d /var/tmp/cordon-bench.XXXXXX)
pids=()
source scripts/netns-pair.sh
cleanup() { netns_teardown "$world" "$inner" "$dir" "${pids[@]}"; }
trap cleanup EXIT

# Network: world 192.0.2.1 (the upstream), cordon's namespace 192.0.2.2.
netns_pair "$world" "$inner" "$tag"
ip netns exec "$world" "$bin/examples/bench_upstream" 192.0.2.1:53 >/dev/null 2>&1 & pids+=($!)

# The same allowlist for both: 999 exact names and one wildcard.
for i in $(seq 0 998); do echo "a$i.allowed.test"; done > "$dir/domains.conf"
echo "*.bench.test" >> "$dir/domains.conf"
{
  echo "no-resolv"; echo "no-hosts"; echo "bind-interfaces"; echo "listen-address=127.0.0.54"
  echo "cache-size=10000"; echo "user=root"; echo "address=/#/"
  echo "ipset=/allowed.test/bench.test/dm4,dm6"
  for i in $(seq 0 998); do echo "server=/a$i.allowed.test/192.0.2.1"; done
  echo "server=/bench.test/192.0.2.1"
} > "$dir/dnsmasq.conf"
ip netns exec "$inner" ipset create dm4 hash:ip family inet timeout 360
ip netns exec "$inner" ipset create dm6 hash:ip family inet6 timeout 360

# cordon as PID 1 of its own pid/mount namespaces, with an agent that only sleeps.
cp /etc/passwd "$dir/passwd"; cp /etc/group "$dir/group"
echo "benchagent:x:4343:4343::$dir/home:/bin/sh" >> "$dir/passwd"; echo "benchagent:x:4343:" >> "$dir/group"
echo "nameserver 192.0.2.1" > "$dir/resolv.conf"
mkdir -p "$dir/home" "$dir/ws"
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
TOML
ip netns exec "$inner" unshare --pid --fork --mount --mount-proc --propagation private -- /bin/sh -c \
  "mount -t tmpfs tmpfs /run && mount --bind $dir/passwd /etc/passwd && mount --bind $dir/group /etc/group && mount --bind $dir/resolv.conf /etc/resolv.conf && exec $bin/cordon init --config $dir/cordon.toml" \
  >/dev/null 2> "$dir/cordon.log" & pids+=($!)
ip netns exec "$inner" dnsmasq --keep-in-foreground --conf-file="$dir/dnsmasq.conf" >/dev/null 2> "$dir/dnsmasq.log" & pids+=($!)
# The floor: answers every query with no records but its question (dnsperf's), nothing else.
ip netns exec "$inner" "$bin/examples/bench_floor" 127.0.0.55:53 >/dev/null 2> "$dir/floor.log" & pids+=($!)

for _ in $(seq 100); do
  ip netns exec "$inner" dig +short +time=1 +tries=1 @127.0.0.53 a1.allowed.test >/dev/null 2>&1 \
    && ip netns exec "$inner" dig +short +time=1 +tries=1 @127.0.0.54 a1.allowed.test >/dev/null 2>&1 \
    && ip netns exec "$inner" dig +short +noedns +time=1 +tries=1 @127.0.0.55 a1.allowed.test >/dev/null 2>&1 && break
  sleep 0.2
done
grep -q "ready" "$dir/cordon.log" || { echo "bench: cordon did not become ready:" >&2; cat "$dir/cordon.log" >&2; exit 1; }

for i in $(seq 0 99); do echo "a$i.allowed.test A"; done > "$dir/allowed.txt"
for i in $(seq 0 99); do echo "x$i.denied.test A"; done > "$dir/denied.txt"
for i in $(seq 1 10000); do echo "n$i.bench.test AAAA"; done > "$dir/unique.txt"
# The flood: 200,000 distinct denied names (each server's denial bookkeeping must stay bounded).
awk 'BEGIN {for (i = 1; i <= 200000; i++) printf "f%d.flood.test A\n", i}' > "$dir/flood.txt"

cpu_ticks() { awk '{print $14 + $15}' /proc/"$1"/stat; } # utime + stime, every thread
measure() { # server queryfile clients server_pid -> "qps avg_latency_ms cpu_us_per_query"
  local before out
  before=$(cpu_ticks "$4")
  out=$(timeout $((secs + 30)) ip netns exec "$inner" "${client[@]}" dnsperf -s "$1" -d "$2" -l "$secs" -c "$3" -q $((25 * $3)) 2>&1)
  awk -v t0="$before" -v t1="$(cpu_ticks "$4")" -v hz="$(getconf CLK_TCK)" '/Queries completed/ {n=$3} /Queries per second/ {q=$4} /Average Latency/ {l=$4*1000}
    END {printf "%.0f %.3f %.1f", q, l, (n > 0 ? (t1 - t0) / hz * 1e6 / n : 0)}' <<<"$out"
}
measure_cordon() { # queryfile clients profile? -> "qps latency cpu", with a profile when asked
  local perf_pid data result
  if $3; then
    data="$dir/perf-$(basename "$1" .txt)-c$2.data"
    perf record -g -o "$data" -p "$supervisor" >/dev/null 2>&1 & perf_pid=$!
  fi
  result=$(measure 127.0.0.53 "$1" "$2" "$supervisor")
  if $3; then
    kill -INT "$perf_pid"; wait "$perf_pid" || true
    { echo "== $(basename "$1" .txt), -c $2: cordon's supervisor, self time by object and symbol (top 25)"
      perf report -i "$data" --stdio --no-children -g none --sort dso,sym 2>/dev/null | grep "%" | awk "NR <= 25" || true
    } >> "$dir/perf.txt"
  fi
  echo "$result"
}
at_rate() { # server queryfile rate server_pid -> "cpu_percent_of_a_core avg_latency_ms"
  local before out
  before=$(cpu_ticks "$4")
  out=$(timeout $((secs + 30)) ip netns exec "$inner" "${client[@]}" dnsperf -s "$1" -d "$2" -l "$secs" -c 4 -Q "$3" 2>&1)
  awk -v t0="$before" -v t1="$(cpu_ticks "$4")" -v hz="$(getconf CLK_TCK)" -v s="$secs" '/Average Latency/ {l=$4*1000}
    END {printf "%.1f %.3f", (t1 - t0) / hz / s * 100, l}' <<<"$out"
}
median() { # printf-format <<< "values": their median (the mean of the middle two for an even count)
  tr ' ' '\n' | sort -g | awk -v f="$1" '{v[NR] = $1} END {printf f, (NR % 2 ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2)}'
}
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.2f", (b > 0 ? a/b : 0)}'; } # a/b, two decimals
row() { # label queryfile clients: one table row, `repeat` pairs of runs on the same file
  local i c d f q l u cq=() cl=() cc=() dq=() dl=() dc=() fq=() fc=() ratios=()
  for ((i = 0; i < repeat; i++)); do
    # Alternate which server goes first, so neither always follows the other's run; the floor
    # runs between them.
    if ((i % 2 == 0)); then
      c=$(measure_cordon "$2" "$3" "$( ((i == 0)) && echo "$profile" || echo false)")
      f=$(measure 127.0.0.55 "$2" "$3" "$floor_pid")
      d=$(measure 127.0.0.54 "$2" "$3" "$dnsmasq_pid")
    else
      d=$(measure 127.0.0.54 "$2" "$3" "$dnsmasq_pid")
      f=$(measure 127.0.0.55 "$2" "$3" "$floor_pid")
      c=$(measure_cordon "$2" "$3" false)
    fi
    read -r q l u <<<"$c"; cq+=("$q"); cl+=("$l"); cc+=("$u")
    read -r q l u <<<"$d"; dq+=("$q"); dl+=("$l"); dc+=("$u")
    read -r q l u <<<"$f"; fq+=("$q"); fc+=("$u")
    ratios+=("$(ratio "${cq[i]}" "${dq[i]}")")
  done
  local mcq mdq mfq
  mcq=$(median %.0f <<<"${cq[*]}"); mdq=$(median %.0f <<<"${dq[*]}"); mfq=$(median %.0f <<<"${fq[*]}")
  echo "| $1 | -c $3 | $mcq | $mdq | $(ratio "$mcq" "$mdq") | ${ratios[*]} | $mfq | $(ratio "$mfq" "$mdq") | $(ratio "$mcq" "$mfq") |" \
    "$(median %.3f <<<"${cl[*]}") ms | $(median %.3f <<<"${dl[*]}") ms | $(median %.1f <<<"${cc[*]}") µs | $(median %.1f <<<"${dc[*]}") µs | $(median %.1f <<<"${fc[*]}") µs |"
}
# Warm both caches with the allowed names.
for s in 127.0.0.53 127.0.0.54; do timeout 60 ip netns exec "$inner" "${client[@]}" dnsperf -s "$s" -d "$dir/allowed.txt" -n 1 >/dev/null 2>&1; done

reaper=$(cat /proc/"${pids[1]}"/task/*/children | awk '{print $1}')
supervisor=$(for p in $(cat /proc/"$reaper"/task/*/children); do if grep -q supervise /proc/"$p"/cmdline; then echo "$p"; fi; done)
rss() { awk '/VmRSS/ {printf "%.1f", $2/1024}' /proc/"$1"/status; }
# Where a process's resident memory is, from smaps: the binary and libraries (file-backed), the
# main heap, the other anonymous mappings (glibc's thread arenas, thread stacks, large
# allocations mmap'd apart); of the files, cordon's own binary; and the thread count.
rss_parts() {
  awk '/^[0-9a-f]+-[0-9a-f]+ / {k = ($6 ~ /^\// ? "files" : ($6 == "[heap]" ? "heap" : ($6 == "[stack]" ? "stack" : "anon"))); own = ($6 ~ /\/cordon$/)}
       /^Rss:/ {r[k] += $2; if (own) o += $2}
       END {printf "files %.1f (cordon binary %.1f), heap %.1f, anon (arenas, thread stacks, large allocations) %.1f, stack %.1f MiB", r["files"]/1024, o/1024, r["heap"]/1024, r["anon"]/1024, r["stack"]/1024}' /proc/"$1"/smaps
  printf ", %s threads" "$(ls /proc/"$1"/task | wc -l)"
}
dnsmasq_pid=$(pgrep -f "conf-file=$dir/dnsmasq.conf" | head -1)
floor_pid=$(pgrep -f "bench_floor 127.0.0.55:53" | head -1)
if $pin; then
  # Every thread of each server, and those it starts later (they inherit it).
  taskset -a -p -c "$server_cpu" "$supervisor" >/dev/null
  taskset -a -p -c "$server_cpu" "$dnsmasq_pid" >/dev/null
  taskset -a -p -c "$server_cpu" "$floor_pid" >/dev/null
  echo "CPUs: dnsperf on $client_cpus, each server on $server_cpu (--pin)"
else
  echo "CPUs: shared by dnsperf and the servers ($(nproc))"
fi

echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
echo
echo "Each row: the median of $repeat runs per server, $secs s each, the two alternating; the ratio of the medians, then each pair's."
echo "The floor (between them in each round): a server that does no DNS work, the most any server could show here."
echo
echo "| query set | clients | cordon q/s | dnsmasq q/s | ratio | each pair | floor q/s | floor / dnsmasq | cordon / floor | cordon avg latency | dnsmasq avg latency | cordon CPU per query | dnsmasq CPU per query | floor CPU per query |"
echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
for c in 4 8; do
  row "allowed, from cache" "$dir/allowed.txt" "$c"
  row "denied" "$dir/denied.txt" "$c"
done

# Memory with 1,000 allowlist entries and 10,000 admitted addresses.
for s in 127.0.0.53 127.0.0.54; do timeout 120 ip netns exec "$inner" "${client[@]}" dnsperf -s "$s" -d "$dir/unique.txt" -n 1 -q 50 >/dev/null 2>&1; done
rss_admitted=$(rss "$supervisor"); dm_rss_admitted=$(rss "$dnsmasq_pid")
parts_admitted=$(rss_parts "$supervisor")
admitted=$(ip netns exec "$inner" ipset list cordon6 | grep -c timeout || true)
dm_admitted=$(ip netns exec "$inner" ipset list dm6 | grep -c timeout || true)

# The unique-name flood: every query a denied name not seen before (until the file wraps), then
# one full pass so each server has seen all 200,000.
for c in 4 8; do row "unique denied names (flood)" "$dir/flood.txt" "$c"; done
for s in 127.0.0.53 127.0.0.54; do timeout 120 ip netns exec "$inner" "${client[@]}" dnsperf -s "$s" -d "$dir/flood.txt" -n 1 -c 4 -q 100 >/dev/null 2>&1; done
rss_flood=$(rss "$supervisor"); dm_rss_flood=$(rss "$dnsmasq_pid"); parts_flood=$(rss_parts "$supervisor")

# The load an agent puts on its resolver: far below either server's ceiling. What does each
# server cost there? One run per rate each, the order alternating.
echo
echo "| allowed, from cache, -c 4, at a fixed rate | cordon CPU | dnsmasq CPU | cordon avg latency | dnsmasq avg latency |"
echo "|---|---|---|---|---|"
i=0
for rate in 500 2000 10000; do
  if ((i++ % 2 == 0)); then
    c=$(at_rate 127.0.0.53 "$dir/allowed.txt" "$rate" "$supervisor"); d=$(at_rate 127.0.0.54 "$dir/allowed.txt" "$rate" "$dnsmasq_pid")
  else
    d=$(at_rate 127.0.0.54 "$dir/allowed.txt" "$rate" "$dnsmasq_pid"); c=$(at_rate 127.0.0.53 "$dir/allowed.txt" "$rate" "$supervisor")
  fi
  read -r cu cl <<<"$c"; read -r du dl <<<"$d"
  echo "| $rate q/s | $cu% of a core | $du% of a core | $cl ms | $dl ms |"
done

echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
echo
echo "| memory | cordon (supervisor) | dnsmasq |"
echo "|---|---|---|"
echo "| RSS after 10,000 admitted addresses | $rss_admitted MiB | $dm_rss_admitted MiB |"
echo "| RSS after 200,000 more unique denied names | $rss_flood MiB | $dm_rss_flood MiB |"
echo "| addresses in the ipset | $admitted | $dm_admitted |"
echo
echo "cordon's RSS after the admitted addresses: $parts_admitted"
echo "cordon's RSS after the flood: $parts_flood"
if $profile; then echo; echo '```'; cat "$dir/perf.txt"; echo '```'; fi
echo
"$bin/examples/admission_bench"
