#!/usr/bin/env bash
# A user's sessions with their live connections. Usage: user-sessions.sh USER_ID
#   session <session_id> created_at=… last_seen_at=… expires_at=… idle_timeout_secs=… ip=… user_agent=…
#     connection <connection_id> node=<node_id> connected_at=…
# Times in UTC. One read-only script call in Redis (the user's keys share one slot).
source "$(dirname "$0")/common.sh"
need_arg "${1:-}" USER_ID
u=$1
# The reads of sh_user_sessions, without its clean-up of stale index entries, as
# tab-separated lines (control characters of the user agent escaped).
script='#!lua flags=no-writes
local P = string.match(KEYS[1], "^(.-){%x%x}:")
local function clean(s) return (string.gsub(s or "", "%c", function(c) return string.format("\\x%02x", string.byte(c)) end)) end
local out = {}
for _, sid in ipairs(redis.call("HKEYS", KEYS[1])) do
  local sk = P .. "{" .. string.sub(sid, 1, 2) .. "}:session:" .. sid
  local f = redis.call("HMGET", sk, "created_at", "last_seen_at", "expires_at", "idle_ms", "ip", "user_agent")
  if f[1] then
    table.insert(out, table.concat({ "session", sid, f[1], f[2], f[3], f[4], clean(f[5]), clean(f[6]) }, "\31"))
    local conns = redis.call("HGETALL", sk .. ":conns")
    for i = 1, #conns, 2 do
      local node, at = string.match(conns[i + 1], "^([^|]*)|(%d+)$")
      table.insert(out, table.concat({ "conn", conns[i], node or "?", at or "0" }, "\31"))
    end
  end
end
return out'
out=$(rcli_one EVAL "$script" 1 "${P}{$(user_bucket "$u")}:user:$u:sessions")
while IFS=$'\x1f' read -r kind a b c d e f g; do
  case $kind in
    session) echo "session $a created_at=$(utc "$b") last_seen_at=$(utc "$c") expires_at=$(utc "$d")" \
      "idle_timeout_secs=$((e / 1000)) ip=${f:--} user_agent=$g" ;;
    conn) echo "  connection $a node=$b connected_at=$(utc "$c")" ;;
  esac
done <<<"$out"
