#!/usr/bin/env bash
# Live nodes: id, lease expiry (UTC; renewed by each heartbeat, so expiry minus the
# lease TTL is the last heartbeat), seconds left, and connections held.
# Two redis-cli calls whatever the number of nodes: the lease table, then one batch
# of HLEN per node and bucket (the node's records are kept per bucket).
source "$(dirname "$0")/common.sh"
leases=$(rcli_one ZRANGE "${P}nodes" 0 -1 WITHSCORES | pairs)
[ -n "$leases" ] || die "no live node under key prefix $P (every node down, or another prefix or database)"
nodes=() expiries=()
while read -r node expiry; do
  nodes+=("$node")
  expiries+=("${expiry%.*}")
done <<<"$leases"
mapfile -t conns < <(
  for node in "${nodes[@]}"; do
    for b in $(buckets); do echo "HLEN \"${P}{$b}:node:$node:conns\""; done
  done | rcli_batch | awk '{ s += $1 } NR % 256 == 0 { print s; s = 0 }'
  echo end
)
[ "${#conns[@]}" = $((${#nodes[@]} + 1)) ] || die "unexpected answer from Redis"
now=$(now_ms)
for i in "${!nodes[@]}"; do
  left=$(((expiries[i] - now) / 1000))
  echo "${nodes[i]} lease_expires_at=$(utc "${expiries[i]}") seconds_left=$left connections=${conns[i]}"
done
