-- kill_session.lua: end one session everywhere, atomically.
--
-- KEYS[1]  the session's hash          <prefix>{<tag>}:session:<session_id>
-- ARGV[1]  reason: killed | logout | expired            (optional, default killed)
-- ARGV[2]  owner user_id, or "" for any. A session of another user is treated
--          exactly like an unknown one.                   (optional)
--
-- Returns 1 if the session was ended, 0 if there was none (or not the owner's).
-- Deletes the session hash, its connections hash and its entry in the user's index,
-- then publishes, once on <prefix>node:<node_id> for each node holding one of its
-- sockets:  {"t":"session_ended","session_ids":["<session_id>"],"reason":"<reason>"}
--
-- Operators run this very file:
--   redis-cli --eval lua/kill_session.lua 'sh:{<tag>}:session:<session_id>'
local key = KEYS[1]
local reason = ARGV[1] or 'killed'
if reason == '' then reason = 'killed' end
local owner = ARGV[2] or ''
local base, sid = string.match(key, '^(.*)session:([0-9a-f]+)$')
if not base then return redis.error_reply('BADKEY session key must end in session:<id>') end
local prefix = string.match(base, '^(.*){')

local user = redis.call('HGET', key, 'user_id')
if not user then return 0 end
if owner ~= '' and owner ~= user then return 0 end

local nodes = {}
for _, conn in ipairs(redis.call('HVALS', key .. ':conns')) do
  local node = string.match(conn, '^([^|]+)|')
  if node then nodes[node] = true end
end
redis.call('DEL', key, key .. ':conns')
redis.call('HDEL', base .. 'user:' .. user .. ':sessions', sid)

local event = cjson.encode({ t = 'session_ended', session_ids = { sid }, reason = reason })
for node in pairs(nodes) do
  redis.call('PUBLISH', prefix .. 'node:' .. node, event)
end
return 1
