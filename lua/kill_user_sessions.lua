-- kill_user_sessions.lua: end every session of a user (but one), atomically.
--
-- KEYS[1]  the user's session index    <prefix>{<tag>}:user:<user_id>:sessions
-- ARGV[1]  reason: killed | logout | expired            (optional, default killed)
-- ARGV[2]  a session_id to keep (sign out all *other* sessions), or ""  (optional)
--
-- Returns the number of sessions ended. For each node holding sockets of ended
-- sessions, publishes once on <prefix>node:<node_id>:
--   {"t":"session_ended","session_ids":[...],"reason":"<reason>"}
--
-- Operators run this very file:
--   redis-cli --eval lua/kill_user_sessions.lua 'sh:{<tag>}:user:<user_id>:sessions'
local user_key = KEYS[1]
local reason = ARGV[1] or 'killed'
if reason == '' then reason = 'killed' end
local keep = ARGV[2] or ''
local base = string.match(user_key, '^(.-{[^}]*}:)user:.*:sessions$')
if not base then return redis.error_reply('BADKEY index key must be <prefix>{<tag>}:user:<id>:sessions') end
local prefix = string.match(base, '^(.*){')

local per_node, killed = {}, 0
for _, sid in ipairs(redis.call('HKEYS', user_key)) do
  if sid ~= keep then
    local key = base .. 'session:' .. sid
    if redis.call('EXISTS', key) == 1 then
      killed = killed + 1
      local seen = {}
      for _, conn in ipairs(redis.call('HVALS', key .. ':conns')) do
        local node = string.match(conn, '^([^|]+)|')
        if node and not seen[node] then
          seen[node] = true
          per_node[node] = per_node[node] or {}
          table.insert(per_node[node], sid)
        end
      end
      redis.call('DEL', key, key .. ':conns')
    end
    redis.call('HDEL', user_key, sid)
  end
end

for node, sids in pairs(per_node) do
  redis.call('PUBLISH', prefix .. 'node:' .. node,
    cjson.encode({ t = 'session_ended', session_ids = sids, reason = reason }))
end
return killed
