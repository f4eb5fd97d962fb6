#!/usr/bin/env bash
# Online users, one "user_id connections" line each, in pages of LIMIT (default 100)
# after AFTER (exclusive), then the counts. Usage: online-users.sh [AFTER] [LIMIT]
source "$(dirname "$0")/common.sh"
# Each bucket holds its own users in order: merge one page of each (an empty page
# prints a blank line, dropped by `awk NF`).
limit=${2:-100}
for b in $(buckets); do
  rcli FCALL sh_online_users 1 "${P}{$b}:online" "${1:-}" "$limit"
done | awk NF | pairs | LC_ALL=C sort | head -n "$limit"
mapfile -t nodes < <(rcli ZRANGE "${P}nodes" 0 -1 | awk NF)
for b in $(buckets); do
  rcli FCALL sh_presence_counts 1 "${P}{$b}:online" "${nodes[@]}"
done | paste - - | awk -v n="${#nodes[@]}" \
  '{ u += $1; c += $2 } END { printf "online_users=%d connections=%d nodes=%d\n", u, c, n }'
