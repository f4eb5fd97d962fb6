-- user_sessions.lua: a user's live sessions with their connections, in one step.
--
-- KEYS[1]  the user's session index    <prefix>{<tag>}:user:<user_id>:sessions
--
-- Returns one entry per live session:
--   {session_id, user_agent, ip, created_at, last_seen_at, expires_at,
--    {connection_id, "<node_id>|<connected_at>", ...}}
-- (times in Unix ms). Index entries of sessions that expired on their own are
-- removed on the way.
--
-- Operators run this very file:
--   redis-cli --eval lua/user_sessions.lua 'sh:{<tag>}:user:<user_id>:sessions'
local user_key = KEYS[1]
local base = string.match(user_key, '^(.-{[^}]*}:)user:.*:sessions$')
if not base then return redis.error_reply('BADKEY index key must be <prefix>{<tag>}:user:<id>:sessions') end

local out = {}
for _, sid in ipairs(redis.call('HKEYS', user_key)) do
  local key = base .. 'session:' .. sid
  local f = redis.call('HMGET', key,
    'user_agent', 'ip', 'created_at', 'last_seen_at', 'expires_at')
  if not f[3] then
    redis.call('HDEL', user_key, sid)
  else
    table.insert(out, { sid, f[1], f[2], f[3], f[4], f[5], redis.call('HGETALL', key .. ':conns') })
  end
end
return out
