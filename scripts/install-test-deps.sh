#!/usr/bin/env bash
# Installs the system packages cordon's test suite uses (Debian/Ubuntu, as root). The image
# tests need a Docker engine (docker.io) and debootstrap (a base image where no registry is
# reachable); the engine is started by scripts/docker-engine.sh, never by the package: a
# temporary policy-rc.d keeps dpkg from starting services, so the host's network and firewall
# stay as they are. The metrics tests check the endpoint with promtool (package prometheus: its
# daemon is not started, for the same reason) and the OpenMetrics parser of python3-prometheus-client.
set -euo pipefail
packages=(iproute2 util-linux bsdutils mount procps iptables ipset dnsutils netcat-openbsd tmux git make
  docker.io debootstrap openssl curl python3
  prometheus python3-prometheus-client jq)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "installing: ${missing[*]}"
  guard=
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\n# cordon install-test-deps: no service starts during this install\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    guard=/usr/sbin/policy-rc.d
  fi
  trap '[ -n "$guard" ] && rm -f "$guard"' EXIT
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
