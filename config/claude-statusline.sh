#!/bin/bash
# Claude Code status line (settings `statusLine`, on with `[claude] status_line = true`): reads
# the status-line JSON Claude Code writes on stdin and prints one line: the model, a bar of the
# context window in use, and the tmux session (named after the task by the Stop hook) or else
# the short session id. Runs as the agent; reads nothing but its stdin and tmux.
set -u
input=$(cat)
field() { jq -r "$1 // empty" <<<"$input" 2>/dev/null; }

model=$(field '.model.display_name')
used=$(field '.context_window.used_percentage')
session=""
if [ -n "${TMUX:-}" ]; then
    session=$(tmux display-message -p '#S' 2>/dev/null)
fi
if [ -z "$session" ]; then
    session=$(field '.session_id' | cut -c1-8)
fi

if [[ "$used" =~ ^[0-9]+(\.[0-9]+)?$ ]]; then
    pct=${used%.*}
    filled=$(( pct / 10 ))
    (( filled > 10 )) && filled=10
    bar=$(printf '%*s' "$filled" '' | tr ' ' '#')$(printf '%*s' $(( 10 - filled )) '' | tr ' ' '-')
    if (( pct <= 65 )); then colour=32; elif (( pct <= 85 )); then colour=33; else colour=31; fi
    context=$(printf '\033[%sm[%s] %s%%\033[0m' "$colour" "$bar" "$pct")
else
    context="[----------] --%"
fi

printf '%s | %s | %s\n' "${model:-?}" "$context" "${session:-?}"
