#!/usr/bin/env bash
# Online users, one "user_id connections" line each, in pages of LIMIT (default 100)
# after AFTER (exclusive), then the counts. Usage: online-users.sh [AFTER] [LIMIT]
source "$(dirname "$0")/common.sh"
rcli FCALL sh_online_users 1 "${P}online" "${1:-}" "${2:-100}" | pairs
read -r users conns nodes < <(rcli FCALL sh_presence_counts 1 "${P}nodes" | paste -sd' ')
echo "online_users=$users connections=$conns nodes=$nodes"
