#!/usr/bin/env bash
# The quick start: builds cordon's image, starts a container with the shipped default
# configuration and the demo agent (config/demo.toml), and joins the agent's tmux session the
# way an operator does, with `docker exec -it <container> bash -i`. Detach with Ctrl-b d; the
# container keeps running until you stop it.
#
# Needs a running Docker engine (and root, or the docker group). Options, as environment:
#   CORDON_NAME            container name (default cordon-demo)
#   CORDON_DOCKER_NETWORK  value for docker run --network (default: the engine's default network)
set -euo pipefail
cd "$(dirname "$0")/.."
name=${CORDON_NAME:-cordon-demo}
image=cordon:dev

if ! docker info >/dev/null 2>&1; then
  echo "quickstart: no Docker engine answers. Start yours (systemctl start docker), or, as root," >&2
  echo "  bash scripts/docker-engine.sh   # an engine that leaves the host's network and firewall alone" >&2
  exit 1
fi

# A container of that name is replaced only if an earlier quick start made it.
if docker inspect "$name" >/dev/null 2>&1; then
  if [ "$(docker inspect -f '{{index .Config.Labels "cordon.quickstart"}}' "$name")" != 1 ]; then
    echo "quickstart: a container named $name exists and is not the quick start's; set CORDON_NAME" >&2
    exit 1
  fi
  docker rm -f "$name" >/dev/null
fi

echo "quickstart: building $image (scripts/build-image.sh)"
TAG=$image bash scripts/build-image.sh

network=(--hostname "$name")
if [ -n "${CORDON_DOCKER_NETWORK:-}" ]; then
  network=(--network "$CORDON_DOCKER_NETWORK")   # container:<name> shares that one's hostname too
elif ! docker network inspect bridge >/dev/null 2>&1; then
  echo "quickstart: this engine has no bridge network (started without one?), so the container gets"
  echo "            no network: the lockdown is the same, but allowed names will not resolve"
  network+=(--network none)
fi

# Profile 1: cordon mounts its tmpfs, remounts the root read-only and installs the egress
# firewall itself, so it needs NET_ADMIN and SYS_ADMIN (and mount(2) past AppArmor).
echo "quickstart: starting $name"
docker run -d --name "$name" --label cordon.quickstart=1 "${network[@]}" \
  --cap-add NET_ADMIN --cap-add SYS_ADMIN --security-opt apparmor=unconfined \
  -e CORDON_CONFIG=/etc/cordon/demo.toml "$image" >/dev/null

if [ -t 0 ] && [ -t 1 ]; then
  echo "quickstart: joining the agent's session (Ctrl-b d detaches)"
  docker exec -it "$name" bash -i || true
else
  echo "quickstart: not on a terminal, so not joining the session"
fi
cat <<MSG

quickstart: $name keeps running.
  join:    docker exec -it $name bash -i
  status:  docker exec $name cordon status
  stop:    docker stop $name      (a graceful stop; then docker rm $name)
MSG
