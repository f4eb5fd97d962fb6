#!/usr/bin/env bash
# Ends a session everywhere, exactly like DELETE /api/v1/sessions/{id}: its sockets
# on every node get session_ended and close 4001; its token is refused from now on.
# Usage: kill-session.sh SESSION_ID
source "$(dirname "$0")/common.sh"
need_arg "${1:-}" SESSION_ID
s=$1
[[ $s =~ ^[0-9a-f]{32}$ ]] || die "not a session id (32 lower-case hex digits): $s"
# Checked: redis-cli exits 0 on an error reply (a replica's READONLY, NOAUTH, a
# library not loaded), which must not read as "no such session".
n=$(rcli_one FCALL sh_kill_session 1 "${P}{${s:0:2}}:session:$s" killed)
case $n in
  1) echo "killed $s" ;;
  0) echo "no such session under key prefix $P: $s" >&2; exit 1 ;;
  *) die "unexpected answer from Redis: $n" ;;
esac
