#!/usr/bin/env bash
# A session's fields and its connections (connection_id -> node_id|connected_at).
# Usage: session-connections.sh SESSION_ID
source "$(dirname "$0")/common.sh"
need_arg "${1:-}" SESSION_ID
s=$1
key="${P}{${s:0:2}}:session:$s"
[ "$(rcli EXISTS "$key")" = 1 ] || { echo "no such session: $s" >&2; exit 1; }
rcli HGETALL "$key" | pairs | grep -v '^secret_hash '
echo "connections:"
rcli HGETALL "$key:conns" | pairs
