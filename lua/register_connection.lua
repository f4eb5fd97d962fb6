-- register_connection.lua: check a token and record a live connection, atomically.
--
-- KEYS[1]  the session's hash          <prefix>{<tag>}:session:<session_id>
-- KEYS[2]  the session's connections   <prefix>{<tag>}:session:<session_id>:conns
-- ARGV[1]  secret_hash presented: hex SHA-256 of the token's secret
-- ARGV[2]  connection_id
-- ARGV[3]  node_id holding the socket
-- ARGV[4]  now, Unix milliseconds
--
-- Returns nil if there is no live session or the secret does not match; otherwise
-- {user_id, user_agent, ip, created_at, last_seen_at, expires_at}.
-- The connection is stored as  connection_id -> "<node_id>|<connected_at ms>".
local f = redis.call('HMGET', KEYS[1],
  'secret_hash', 'user_id', 'user_agent', 'ip', 'created_at', 'expires_at')
if not f[1] then return false end

-- Constant-time comparison: look at every byte whatever the first difference.
local stored, given = f[1], ARGV[1]
if #stored ~= #given then return false end
local diff = 0
for i = 1, #stored do
  diff = bit.bor(diff, bit.bxor(string.byte(stored, i), string.byte(given, i)))
end
if diff ~= 0 then return false end
if tonumber(f[6]) <= tonumber(ARGV[4]) then return false end

redis.call('HSET', KEYS[1], 'last_seen_at', ARGV[4])
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3] .. '|' .. ARGV[4])
redis.call('PEXPIREAT', KEYS[2], f[6])
return {f[2], f[3], f[4], f[5], ARGV[4], f[6]}
