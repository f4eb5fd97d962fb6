#!/usr/bin/env bash
# Live nodes: id, lease expiry (Unix ms; renewed by each heartbeat, so expiry minus
# the lease TTL is the last heartbeat), seconds left, and connections held.
source "$(dirname "$0")/common.sh"
now_ms=$(( $(date +%s%N) / 1000000 ))
rcli ZRANGE "${P}nodes" 0 -1 WITHSCORES | pairs | while read -r node expiry; do
  conns=0
  for b in $(buckets); do
    conns=$(( conns + $(rcli HLEN "${P}{$b}:node:$node:conns") ))
  done
  left=$(( (${expiry%.*} - now_ms) / 1000 ))
  echo "$node lease_expires_at=${expiry%.*} seconds_left=$left connections=$conns"
done
