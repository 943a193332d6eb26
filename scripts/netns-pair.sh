# Sourced by bench/run.sh, bench/namebound.sh and scripts/demo.sh: two network namespaces joined
# by a veth pair,
# a "world" at 192.0.2.1 and cordon's side at 192.0.2.2 with its default route via the world.
# Usage: netns_pair WORLD INNER TAG   (TAG keeps interface names short and unique)
netns_pair() {
  local world=$1 inner=$2 tag=$3
  ip netns add "$world"
  ip netns add "$inner"
  ip link add "vw$tag" netns "$world" type veth peer name "vi$tag" netns "$inner"
  ip -n "$world" addr add 192.0.2.1/24 dev "vw$tag"
  ip -n "$inner" addr add 192.0.2.2/24 dev "vi$tag"
  ip -n "$world" link set lo up
  ip -n "$inner" link set lo up
  ip -n "$world" link set "vw$tag" up
  ip -n "$inner" link set "vi$tag" up
  ip -n "$inner" route add default via 192.0.2.1
}

# Teardown for the benchmarks: kills every pid in the array PIDS (for an unshare wrapper, the
# namespace's init first: unshare's forked child, cordon as PID 1, outlives a killed unshare and
# takes the namespace down with it), deletes the namespaces and removes DIR.
# Usage: netns_teardown WORLD INNER DIR PIDS...
netns_teardown() {
  local world=$1 inner=$2 dir=$3 p c
  shift 3
  for p in "$@"; do
    for c in $(cat /proc/"$p"/task/*/children 2>/dev/null); do kill -KILL "$c" 2>/dev/null || true; done
    kill -KILL "$p" 2>/dev/null || true
  done
  ip netns del "$inner" 2>/dev/null || true; ip netns del "$world" 2>/dev/null || true
  rm -rf "$dir"
}
