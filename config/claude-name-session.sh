#!/bin/bash
# Claude Code Stop hook (settings `hooks.Stop`, on with `[claude] name_session = true`): once
# per tmux session, asks Claude (a short `claude -p` on the agent's own credentials, behind the
# firewall like everything the agent runs) for a kebab-case name for the task, and renames the
# agent's tmux session to `<session>-<name>`. The agent owns its tmux server, so no root is
# involved. The new name starts with the configured one: cordon and `cordon attach` find the
# session by that prefix (tmux(1), "target-session": an exact name, then the start of one).
# Returns at once; the naming runs in the background. Never fails the hook.
set -u
[ -n "${CORDON_NAMING_SESSION:-}" ] && exit 0   # the naming call's own Stop
[ -n "${TMUX:-}" ] || exit 0                    # not in the agent's tmux session
input=$(cat)

current=$(tmux display-message -p '#S' 2>/dev/null) || exit 0
[ -n "$current" ] || exit 0
[ "$(tmux show-options -qv -t "$current" @cordon-named 2>/dev/null)" = 1 ] && exit 0

transcript=$(jq -r '.transcript_path // empty' <<<"$input" 2>/dev/null)
task=""
if [ -n "$transcript" ] && [ -r "$transcript" ]; then
    # The first user message: what the task is.
    task=$(jq -r 'select(.type == "user") | .message.content | if type == "string" then . else (map(.text? // empty) | join(" ")) end' \
        "$transcript" 2>/dev/null | head -c 2000)
fi
[ -n "$task" ] || exit 0

(
    name=$(CORDON_NAMING_SESSION=1 timeout 60 claude -p --max-turns 1 --model haiku \
        "Name this coding task in 2 to 5 lowercase words joined by hyphens, nothing else. Task: $task" 2>/dev/null \
        | head -n 1 | tr 'A-Z' 'a-z' | tr -c 'a-z0-9-' '-' | sed 's/--*/-/g; s/^-//; s/-$//' | cut -c1-40)
    if [ -n "$name" ] && tmux rename-session -t "$current" "$current-$name" 2>/dev/null; then
        tmux set-option -t "$current-$name" @cordon-named 1 2>/dev/null
    fi
) </dev/null >/dev/null 2>&1 &
disown 2>/dev/null
exit 0
