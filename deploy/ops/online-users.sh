#!/usr/bin/env bash
# Online users, one "user_id connections" line each, in pages of LIMIT (default 100)
# after AFTER (exclusive), then the counts. Usage: online-users.sh [AFTER] [LIMIT]
# Two redis-cli calls: the live nodes, then one batch of a page and the counts of
# each of the 256 buckets.
source "$(dirname "$0")/common.sh"
after=${1:-}
limit=${2:-100}
[[ $after =~ ^[A-Za-z0-9._@+:-]*$ ]] || die "AFTER must be a user id"
[[ $limit =~ ^[1-9][0-9]*$ ]] || die "LIMIT must be a positive number"
nodes_out=$(rcli_one ZRANGE "${P}nodes" 0 -1)
mapfile -t nodes < <(printf "%s\n" "$nodes_out" | awk NF)
out=$(
  {
    for b in $(buckets); do echo "FCALL sh_online_users 1 \"${P}{$b}:online\" \"$after\" $limit"; done
    echo 'ECHO "-- counts --"'
    for b in $(buckets); do echo "FCALL sh_presence_counts 1 \"${P}{$b}:online\" ${nodes[*]}"; done
  } | rcli_batch
)
# Every bucket's counts came back (on Redis Cluster a master that cannot be reached
# leaves its buckets' answers out): else nothing is printed, not a partial page.
printf '%s\n' "$out" | awk '
  $0 == "-- counts --" { counting = 1; next }
  counting && NF { i++ }
  END { exit !(counting && i == 512) }' || die "incomplete answer from Redis (a master unreachable?)"
# Each bucket holds its own users in order: merge one page of each (an empty page
# prints a blank line, dropped).
printf '%s\n' "$out" | awk '$0 == "-- counts --" { done = 1 } !done && NF' | pairs | LC_ALL=C sort | awk -v n="$limit" 'NR <= n'
printf '%s\n' "$out" | awk -v n="${#nodes[@]}" '
  $0 == "-- counts --" { counting = 1; next }
  counting && NF { if (++i % 2) u += $1; else c += $1 }
  END { printf "online_users=%d connections=%d nodes=%d\n", u, c, n }'
