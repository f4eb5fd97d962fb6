-- create_session.lua: create a session and tell the user's other sessions, atomically.
--
-- KEYS[1]  the new session's hash      <prefix>{<tag>}:session:<session_id>
-- KEYS[2]  the user's session index    <prefix>{<tag>}:user:<user_id>:sessions
-- ARGV[1]  user_id
-- ARGV[2]  secret_hash: hex SHA-256 of the token's secret (never the secret itself)
-- ARGV[3]  user_agent ("" for none)
-- ARGV[4]  ip ("" for none)
-- ARGV[5]  now, Unix milliseconds
-- ARGV[6]  expires_at, Unix milliseconds
--
-- Returns the number of nodes notified, or the error "EXISTS" if the id is taken.
-- Publishes, once on <prefix>node:<node_id> for each node that holds a socket of
-- another live session of the user:
--   {"t":"session_created","session":{session_id,user_id,user_agent,ip,created_at,
--    last_seen_at,expires_at}}   (times as strings of Unix ms)
-- All keys share the user's hash tag, so this is one slot in Redis Cluster.
local session_key, user_key = KEYS[1], KEYS[2]
local base, sid = string.match(session_key, '^(.*)session:([0-9a-f]+)$')
if not base then return redis.error_reply('BADKEY session key must end in session:<id>') end
local prefix = string.match(base, '^(.*){')

if redis.call('EXISTS', session_key) == 1 then
  return redis.error_reply('EXISTS session id taken')
end
redis.call('HSET', session_key,
  'user_id', ARGV[1], 'secret_hash', ARGV[2], 'user_agent', ARGV[3], 'ip', ARGV[4],
  'created_at', ARGV[5], 'last_seen_at', ARGV[5], 'expires_at', ARGV[6])
redis.call('PEXPIREAT', session_key, ARGV[6])

-- Which nodes hold sockets of the user's other sessions? Tidy index entries of
-- sessions that expired on their own while we are here.
local nodes, count = {}, 0
for _, other in ipairs(redis.call('HKEYS', user_key)) do
  local other_key = base .. 'session:' .. other
  if redis.call('EXISTS', other_key) == 0 then
    redis.call('HDEL', user_key, other)
  else
    for _, conn in ipairs(redis.call('HVALS', other_key .. ':conns')) do
      local node = string.match(conn, '^([^|]+)|')
      if node and not nodes[node] then
        nodes[node] = true
        count = count + 1
      end
    end
  end
end

redis.call('HSET', user_key, sid, ARGV[6])
-- The index lives as long as its longest-lived session (-1: no expiry set yet).
if redis.call('PEXPIRETIME', user_key) < tonumber(ARGV[6]) then
  redis.call('PEXPIREAT', user_key, ARGV[6])
end

if count > 0 then
  local event = cjson.encode({
    t = 'session_created',
    session = {
      session_id = sid, user_id = ARGV[1], user_agent = ARGV[3], ip = ARGV[4],
      created_at = ARGV[5], last_seen_at = ARGV[5], expires_at = ARGV[6],
    },
  })
  for node in pairs(nodes) do
    redis.call('PUBLISH', prefix .. 'node:' .. node, event)
  end
end
return count
