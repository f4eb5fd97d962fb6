#!/usr/bin/env bash
# Ends every session of a user everywhere. Usage: kill-user.sh USER_ID
source "$(dirname "$0")/common.sh"
need_arg "${1:-}" USER_ID
u=$1
n=$(rcli FCALL sh_kill_user_sessions 1 "${P}{$(user_bucket "$u")}:user:$u:sessions" killed)
echo "killed $n session(s) of $u"
