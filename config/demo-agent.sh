#!/bin/bash
# cordon's demo agent (the quick start's): shows from the agent's side what the lockdown means,
# then leaves an interactive shell in the agent's pane for trying things. Installed in the image
# as /usr/local/share/cordon/demo-agent; config/demo.toml runs it.

row() { printf '  %-14s %s\n' "$1" "$2"; }

# Resolve a name through cordon's DNS server, then open a TCP connection to it on port 443.
# Without an address, `cordon status why` tells a denied name from an unanswered allowed one.
reach() {
  local addr
  addr=$(getent ahosts "$1" | awk 'NR == 1 { print $1 }')
  if [ -z "$addr" ]; then
    case "$(cordon status why "$1" 2>/dev/null | head -1)" in
      *": denied"*) echo "$1: denied, answered NXDOMAIN by cordon; the query never left" ;;
      *) echo "$1: allowed, but the upstream resolver did not answer (no network?)" ;;
    esac
  elif timeout 5 bash -c "exec 3<>/dev/tcp/$1/443" 2>/dev/null; then
    echo "$1: connected to $addr port 443"
  else
    echo "$1: resolved to $addr, but the connection failed"
  fi
}

echo
echo "  cordon demo agent: this pane is where an AI coding agent runs."
echo
row "user" "$(id)"
row "capabilities" "effective $(awk '/^CapEff/ { print $2 }' /proc/self/status), no_new_privs $(awk '/^NoNewPrivs/ { print $2 }' /proc/self/status)"
if touch /cordon-demo-write 2>/dev/null; then
  row "write to /" "succeeded (the root should be read-only!)"
else
  row "write to /" "refused: the root filesystem is read-only"
fi
row "allowed name" "$(reach api.anthropic.com)"
row "denied name" "$(reach exfil.example.org)"
if timeout 5 bash -c 'exec 3<>/dev/tcp/203.0.113.10/443' 2>/dev/null; then
  row "direct IP" "203.0.113.10:443 connected (it should be refused!)"
else
  row "direct IP" "203.0.113.10:443 refused: no allowed name resolved to it"
fi
echo
echo "  Try, in this shell or the one below (both run as the agent):"
echo "    getent hosts github.com; curl -sI https://example.org; cordon status why example.org"
echo "  Detach with Ctrl-b d; reattach with: docker exec -it <container> bash -i"
echo
exec bash -i
