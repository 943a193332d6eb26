#!/usr/bin/env bash
# Makes sure a Docker engine answers on /var/run/docker.sock, for the image tests and the quick
# start on machines where none runs (CI). An engine that already runs is used as it is. One this
# script starts leaves the host's firewall and network alone: no iptables or ip6tables rules, no
# docker0 bridge, no ip_forward change. Containers then get `--network none` or the network of
# another container, which is all the tests need. Its log: /var/log/cordon-dockerd.log.
set -euo pipefail
if docker info >/dev/null 2>&1; then exit 0; fi
[ "$(id -u)" -eq 0 ] || { echo "docker-engine: no Docker engine answers, and starting one needs root" >&2; exit 1; }
command -v dockerd >/dev/null || { echo "docker-engine: dockerd not found (apt-get install docker.io)" >&2; exit 1; }
echo "docker-engine: starting dockerd without networking changes (log /var/log/cordon-dockerd.log)"
setsid dockerd --iptables=false --ip6tables=false --ip-forward=false --ip-masq=false --bridge=none \
  >>/var/log/cordon-dockerd.log 2>&1 </dev/null &
for _ in $(seq 1 60); do
  if docker info >/dev/null 2>&1; then exit 0; fi
  sleep 0.5
done
echo "docker-engine: dockerd did not answer within 30 s; its log:" >&2
tail -20 /var/log/cordon-dockerd.log >&2
exit 1
