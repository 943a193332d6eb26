#!/usr/bin/env bash
# Installs the system packages cordon's test suite uses (Debian/Ubuntu, as root).
set -euo pipefail
packages=(iproute2 util-linux mount procps iptables ipset dnsutils netcat-openbsd tmux git make)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "installing: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
