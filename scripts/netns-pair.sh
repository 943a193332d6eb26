# Sourced by bench/run.sh and scripts/demo.sh: two network namespaces joined by a veth pair,
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
