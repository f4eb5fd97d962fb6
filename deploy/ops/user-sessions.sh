#!/usr/bin/env bash
# A user's sessions with their live connections. Usage: user-sessions.sh USER_ID
source "$(dirname "$0")/common.sh"
need_arg "${1:-}" USER_ID
u=$1
rcli --no-raw FCALL sh_user_sessions 1 "${P}{$(user_bucket "$u")}:user:$u:sessions"
