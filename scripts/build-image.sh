#!/usr/bin/env bash
# Builds cordon's image as cordon:dev, also where no container registry is reachable:
#   - the base is debian:bookworm-slim if the engine has it or can pull it; otherwise a
#     bookworm minbase made with debootstrap (from the Debian mirror) and `docker import`ed;
#   - cordon is built from source in rust:1.95-bookworm if that image is available; otherwise
#     with this machine's toolchain and copied in.
# Needs root (debootstrap) and a running Docker engine. Options via the environment:
#   CLAUDE_CODE=<npm version>  install Claude Code (default: none, a lighter image)
#   TAG=<image tag>            default cordon:dev
#   IPTABLES=legacy            iptables-legacy instead of Debian's nf_tables backend
#   EXTRA_CA_CERT=<pem file>   a CA to trust in the build and the image (a TLS-intercepting proxy)
set -euo pipefail
cd "$(dirname "$0")/.."
tag=${TAG:-cordon:dev}
cache=${CORDON_ROOTFS_CACHE:-/var/tmp/cordon-rootfs}

have_image() { docker image inspect "$1" >/dev/null 2>&1 || timeout 60 docker pull -q "$1" >/dev/null 2>&1; }

base=debian:bookworm-slim
if ! have_image "$base"; then
  base=cordon-base:bookworm
  if ! docker image inspect "$base" >/dev/null 2>&1; then
    if [ ! -x "$cache/bookworm/bin/sh" ]; then
      echo "build-image: no registry; debootstrapping a bookworm base into $cache (a few minutes)"
      rm -rf "$cache/bookworm"; mkdir -p "$cache"
      debootstrap --variant=minbase bookworm "$cache/bookworm" http://deb.debian.org/debian
    fi
    tar -C "$cache/bookworm" -c . | docker import - "$base" >/dev/null
  fi
fi

binary_from=source
builder=rust:1.95-bookworm
if ! have_image "$builder"; then
  echo "build-image: no rust image; building cordon with this machine's toolchain"
  cargo build --release --locked --bin cordon
  mkdir -p target/image && cp target/release/cordon target/image/cordon
  binary_from=prebuilt
  builder=$base
fi

mkdir -p target/image
if [ -n "${EXTRA_CA_CERT:-}" ]; then
  cp "$EXTRA_CA_CERT" target/image/extra-ca.crt
else
  rm -f target/image/extra-ca.crt
fi

echo "build-image: base $base, cordon from $binary_from, Claude Code ${CLAUDE_CODE:-not installed}, iptables ${IPTABLES:-nft}"
DOCKER_BUILDKIT=0 docker build --network host \
  --build-arg BASE="$base" --build-arg BUILDER="$builder" --build-arg BINARY_FROM="$binary_from" \
  --build-arg CLAUDE_CODE="${CLAUDE_CODE:-}" --build-arg IPTABLES="${IPTABLES:-nft}" \
  -t "$tag" .
echo "build-image: built $tag"
