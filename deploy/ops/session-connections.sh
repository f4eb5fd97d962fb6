#!/usr/bin/env bash
# A session's fields (times in UTC; never its secret's hash) and its connections:
#   connections:
#   <connection_id> node=<node_id> connected_at=…
# Usage: session-connections.sh SESSION_ID. One read-only script call in Redis
# (fields separated by \x1f, control characters escaped).
source "$(dirname "$0")/common.sh"
need_arg "${1:-}" SESSION_ID
s=$1
[[ $s =~ ^[0-9a-f]{8,64}$ ]] || die "no such session: $s"
script='#!lua flags=no-writes
local function clean(s) return (string.gsub(s or "", "%c", function(c) return string.format("\\x%02x", string.byte(c)) end)) end
local f = redis.call("HGETALL", KEYS[1])
if #f == 0 then return {} end
local out = {}
for i = 1, #f, 2 do
  if f[i] ~= "secret_hash" then table.insert(out, "field\31" .. clean(f[i]) .. "\31" .. clean(f[i + 1])) end
end
local conns = redis.call("HGETALL", KEYS[1] .. ":conns")
for i = 1, #conns, 2 do
  local node, at = string.match(conns[i + 1], "^([^|]*)|(%d+)$")
  table.insert(out, table.concat({ "conn", conns[i], node or "?", at or "0" }, "\31"))
end
return out'
out=$(rcli_one EVAL "$script" 1 "${P}{${s:0:2}}:session:$s")
[ -n "$out" ] || die "no such session: $s"
while IFS=$'\x1f' read -r kind k v; do
  [ "$kind" = field ] || continue
  case $k in
    created_at | last_seen_at | expires_at) echo "$k $(utc "$v")" ;;
    *) echo "$k $v" ;;
  esac
done <<<"$out"
echo "connections:"
while IFS=$'\x1f' read -r kind cid node at; do
  if [ "$kind" = conn ]; then echo "$cid node=$node connected_at=$(utc "$at")"; fi
done <<<"$out"
