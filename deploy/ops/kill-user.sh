#!/usr/bin/env bash
# Ends every session of a user everywhere. Usage: kill-user.sh USER_ID
source "$(dirname "$0")/common.sh"
need_arg "${1:-}" USER_ID
u=$1
# Checked: redis-cli exits 0 on an error reply (a replica's READONLY, NOAUTH, a
# library not loaded), which must not read as "killed".
n=$(rcli_one FCALL sh_kill_user_sessions 1 "${P}{$(user_bucket "$u")}:user:$u:sessions" killed)
[[ $n =~ ^[0-9]+$ ]] || die "unexpected answer from Redis: $n"
echo "killed $n session(s) of $u"
[ "$n" != 0 ] || echo "$(basename "$0"): no session of $u under key prefix $P" >&2
