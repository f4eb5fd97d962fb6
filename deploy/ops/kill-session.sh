#!/usr/bin/env bash
# Ends a session everywhere, exactly like DELETE /api/v1/sessions/{id}: its sockets
# on every node get session_ended and close 4001; its token is refused from now on.
# Usage: kill-session.sh SESSION_ID
source "$(dirname "$0")/common.sh"
need_arg "${1:-}" SESSION_ID
s=$1
n=$(rcli FCALL sh_kill_session 1 "${P}{${s:0:2}}:session:$s" killed)
[ "$n" = 1 ] && echo "killed $s" || { echo "no such session: $s" >&2; exit 1; }
