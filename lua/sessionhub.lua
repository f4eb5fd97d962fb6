#!lua name=sessionhub
--
-- sessionhub's Redis functions. Every state change of sessions, connections, groups
-- and nodes is one call of one function here, so it is atomic, and the events it
-- causes are published in the same step, to exactly the nodes that hold the sockets
-- concerned (found from the connection records).
--
-- Every function touches the keys of one hash slot only, so the same library runs
-- on one Redis and on Redis Cluster (loaded on every master). The hash tag is a
-- bucket B: the first 2 hex digits of a user's tag T (T: the first 8 hex digits of
-- SHA-256 of the user id, also the first 8 characters of each of the user's session
-- and connection ids). So a user, its sessions and connections, and the bucket's
-- share of every index live in one slot; the 256 buckets spread over the shards.
--
-- The nodes load this file at start-up twice (FUNCTION LOAD REPLACE): as the library
-- `sessionhub`, with the function names below, which operators call with redis-cli,
-- for example
--   redis-cli FCALL sh_kill_session 1 'sh:{<B>}:session:<session_id>'
-- and as `sessionhub_<V>`, V the first 16 hex digits of SHA-256 of the library as
-- the node loads it, with `_<V>` after every function name (FUNCTION_SUFFIX below),
-- which is what the node itself calls. So in a rolling upgrade every node calls the
-- functions of its own release (and its own settings), whichever node started last;
-- the last one's is what `sessionhub` holds. A copy stays while a live node names
-- it in its status (Pnode-status:<node_id>); a node deletes the others a few
-- heartbeats after it starts and every 10 minutes. On a Redis that no node has
-- loaded it into yet:
--   redis-cli -x FUNCTION LOAD REPLACE < lua/sessionhub.lua
--
-- Key layout. P is the key prefix (default "sh:"), derived by every function from
-- its first key; B is a bucket (00 .. ff).
--   P{B}:session:<sid>         hash  user_id secret_hash user_agent ip created_at
--                                    last_seen_at expires_at idle_ms; the key's TTL is
--                                    expires_at + 60 s, a backstop: sh_expire ends it first
--   P{B}:session:<sid>:conns   hash  connection_id -> "<node_id>|<connected_at>"
--   P{B}:user:<uid>:sessions   hash  session_id -> expires_at
--   P{B}:user:<uid>:by_age     zset  session_id, score created_at (the oldest ends
--                                    first when a login passes the per-user cap)
--   P{B}:user:<uid>:nodes      hash  node_id -> the user's live connections there
--   P{B}:user:<uid>:conns      hash  connection_id -> node_id: the user's live
--                                    connections (whom a login's notice and a message
--                                    to the user go to, whatever the number of sessions)
--   P{B}:conn:<cid>            hash  session_id user_id node_id connected_at
--   P{B}:conn:<cid>:groups     set   the groups the connection was added to
--   P{B}:group:<group>         hash  the bucket's members: "conn:<cid>" | "user:<uid>" -> added_at
--   P{B}:node:<node>:conns     hash  connection_id -> session_id (a node's records in B)
--   P{B}:leases                hash  node_id -> newest lease a registration in B used;
--                                    "fenced:<node_id>" -> registrations under a lease
--                                    up to this one are refused (the node was reaped);
--                                    sh_expire forgets both once long past
--   P{B}:online                zset  user_id, score 0 (lexical order, for paging)
--   P{B}:online:conns          hash  user_id -> number of live connections
--   P{B}:expiry                zset  session_id -> when it ends by itself (the earlier
--                                    of expires_at and last_seen_at + idle_ms)
--   Pnodes                     zset  node_id -> lease expiry (no hash tag)
--   Pnode-claim:<node_id>      string the nonce of the process running under the id,
--                                    TTL the lease's: one process per node id
--   P{B}:groups:emptied        hash  group -> times its members in B were all gone (the
--                                    sweep forgets B in Pgroup:<group>:in_buckets)
--   Pgroup:<group>:in_buckets  hash  bucket -> adds it has seen: the buckets that may
--                                    hold members (no hash tag)
--   P{B}:user:<uid>:history    stream the user's recoverable frames (messages to the
--                                    user or one of its sessions, session_created): entry
--                                    id <offset>-0, fields at (Unix ms), to (user |
--                                    session:<sid> | others:<sid>: who may recover it),
--                                    frame (the client frame, "offset" included); at most
--                                    the history size entries, the key's TTL the history
--                                    TTL from the last entry. Read it with
--                                    XRANGE P{B}:user:<uid>:history - +
--   P{B}:user:<uid>:history:meta hash epoch (changes when the numbering restarts: the
--                                    history was lost), offset (the last one given out);
--                                    kept the meta TTL (default 24 h, at least the
--                                    history TTL) from the last frame or registration
--   P{B}:events                stream the bucket's lifecycle events, oldest first, capped
--                                    at about EVENTS_MAXLEN entries (see emit below);
--                                    consumer group "sessionhub-webhook" delivers them
--   Psweep                     zset  bucket -> earliest time it may need sh_expire (no
--                                    hash tag; written by the nodes, see sh_sweep_claim)
-- Channels: P{B}:node:<node> carries events for a node's sockets in bucket B (sharded
-- pub/sub, SPUBLISH, on Redis Cluster; classic PUBLISH on one Redis); Pall reaches all.
-- P{B}:events:new rings (an empty message, same rule) once per call that adds entries
-- to P{B}:events.
-- Event payloads are JSON with a stable tag "t"; "message" events are a JSON header
-- line, a newline, then the client frame verbatim.
-- Times are Unix milliseconds, passed in by the caller.
--
-- Deadlines: the functions a request waits for take an optional last argument, a
-- deadline in Unix ms of this Redis's own clock (TIME). Past it, the function does
-- nothing and answers DEADLINE: the node that sent it has already answered its
-- client with an error (Redis was paused, say, and the call waited in the socket),
-- and an error answer must have no later effect. Operators leave it out.

-- The bucket of an id (session, connection or user tag).
local function bucket_of(id)
  return string.sub(id, 1, 2)
end

-- The prefix and bucket of a key of the form P{B}:...
local function split_key(key)
  return string.match(key, '^(.-){(%x%x)}:')
end

local function session_key(P, sid)
  return P .. '{' .. bucket_of(sid) .. '}:session:' .. sid
end

local function conn_key(P, cid)
  return P .. '{' .. bucket_of(cid) .. '}:conn:' .. cid
end

local function user_key(P, B, uid)
  return P .. '{' .. B .. '}:user:' .. uid .. ':sessions'
end

local function node_index(P, B, node)
  return P .. '{' .. B .. '}:node:' .. node .. ':conns'
end

local function bkey(P, B, name)
  return P .. '{' .. B .. '}:' .. name
end

local function user_nodes_key(P, B, uid)
  return P .. '{' .. B .. '}:user:' .. uid .. ':nodes'
end

local function user_age_key(P, B, uid)
  return P .. '{' .. B .. '}:user:' .. uid .. ':by_age'
end

local function user_conns_key(P, B, uid)
  return P .. '{' .. B .. '}:user:' .. uid .. ':conns'
end

-- State of the current call, reset by every function registered with `register`:
-- whether it has rung its bucket's events channel yet (see emit), and Redis's
-- clock as first read in it (Unix ms; a call is one atomic step, so one reading
-- serves all of it).
local rung = false
local call_now_ms = nil
local call_now_arg = nil

-- `fn`, with the per-call state starting afresh at every call.
local function fresh_per_call(fn)
  return function(keys, args)
    rung = false
    call_now_ms = nil
    call_now_arg = nil
    return fn(keys, args)
  end
end

-- After every function's name: '' in the library `sessionhub`, '_<V>' in a node's
-- own copy `sessionhub_<V>` (see the header; the node sets this line).
local FUNCTION_SUFFIX = ''

-- Registers a function (its per-call state fresh at every call).
local function register(name, fn)
  redis.register_function(name .. FUNCTION_SUFFIX, fresh_per_call(fn))
end

-- The same for a function registered with flags ({function_name, flags, callback}).
local function register_with(spec)
  spec.function_name = spec.function_name .. FUNCTION_SUFFIX
  spec.callback = fresh_per_call(spec.callback)
  redis.register_function(spec)
end

-- Redis's clock in Unix ms, read once per call.
local function redis_now_ms()
  if not call_now_ms then
    local t = redis.call('TIME')
    call_now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  end
  return call_now_ms
end

-- The same as a command argument, printed once per call (a batch appends many
-- history entries).
local function redis_now_arg()
  if not call_now_arg then call_now_arg = string.format('%d', redis_now_ms()) end
  return call_now_arg
end

-- Whether the optional deadline `d` (Unix ms, this server's clock) has passed.
local function past_deadline(d)
  d = tonumber(d)
  if not d or d <= 0 then return false end
  return redis_now_ms() > d
end

local function deadline_reply()
  return redis.error_reply('DEADLINE the call arrived after its deadline; nothing was done')
end

-- Whether this Redis runs in cluster mode (asked once per library load).
local cluster_mode = nil

local function in_cluster()
  if cluster_mode == nil then
    cluster_mode = string.match(redis.call('INFO', 'cluster'), 'cluster_enabled:1') ~= nil
  end
  return cluster_mode
end

-- Publishes an event to a node's channel of bucket B: SPUBLISH on Redis Cluster, so
-- only the shard owning B carries it; PUBLISH on one Redis.
local function publish(P, B, node, payload)
  local channel = P .. '{' .. B .. '}:node:' .. node
  if in_cluster() then
    redis.call('SPUBLISH', channel, payload)
  else
    redis.call('PUBLISH', channel, payload)
  end
end

-- Lifecycle events (issue 17). Every change a function makes also appends one entry
-- per event to the bucket's stream P{B}:events, in the same atomic call, so that an
-- operator's redis-cli call produces them too. The entry's fields are `type`, then
-- whichever of user_id, session_id, connection_id, node_id, reason, user_agent, ip,
-- expires_at, idle_ms apply (never a token or a secret hash); its time is the entry
-- id's milliseconds (Redis's clock), and the event id is "<B>-<entry id>". The
-- stream is capped (XADD MAXLEN ~ EVENTS_MAXLEN; the nodes load the library with
-- their SESSIONHUB_EVENTS_MAXLEN in this line, 0 writes no events). A call that
-- appends entries also rings P{B}:events:new once (an empty message; a call touches
-- one bucket), the wake-up of the nodes that deliver webhooks, so that an idle node
-- needs no polling: the ring reaches them after the call, when every entry is there.
local EVENTS_MAXLEN = 1000
local EVENTS_MAXLEN_ARG = EVENTS_MAXLEN .. ''

-- The last stream key emit built, and its prefix and bucket (a kill appends five
-- events to one stream; building the key is a concatenation and a string to intern).
local events_P, events_B, events_key = nil, nil, nil

-- Bucket B's event stream key.
local function events_stream(P, B)
  if P ~= events_P or B ~= events_B then
    events_P, events_B, events_key = P, B, bkey(P, B, 'events')
  end
  return events_key
end

-- Rings B's events channel, once per call (see above).
local function ring(P, B)
  if rung then return end
  rung = true
  redis.call(in_cluster() and 'SPUBLISH' or 'PUBLISH', bkey(P, B, 'events:new'), '')
end

-- Appends event `what` with its field, value, ... pairs as given (all non-empty
-- strings) to B's stream, in one XADD, and rings.
local function append_event(P, B, what, ...)
  redis.call('XADD', events_stream(P, B), 'MAXLEN', '~', EVENTS_MAXLEN_ARG, '*', 'type', what, ...)
  ring(P, B)
end

-- Appends one event {type, field, value, field, value, ...} (values nil or "" are
-- left out) to bucket B's stream, in one XADD.
local function emit(P, B, ev)
  if EVENTS_MAXLEN <= 0 then return end
  -- The common case, every value a non-empty string, goes to XADD as `ev` itself:
  -- growing an argument list one field at a time costs a table resize every few
  -- fields.
  local plain = true
  local last = #ev
  for i = 3, last, 2 do
    local v = ev[i]
    if type(v) ~= 'string' or v == '' then
      plain = false
      break
    end
  end
  if plain and last % 2 == 1 then return append_event(P, B, unpack(ev, 1, last)) end
  local argv = { events_stream(P, B), 'MAXLEN', '~', EVENTS_MAXLEN_ARG, '*', 'type', ev[1] }
  local n = 7
  for i = 2, last, 2 do
    local v = ev[i + 1]
    if v ~= nil and v ~= '' then
      argv[n + 1] = ev[i]
      argv[n + 2] = tostring(v)
      n = n + 2
    end
  end
  redis.call('XADD', unpack(argv, 1, n))
  ring(P, B)
end

-- Whether an event's value is there (emit leaves nil and "" out).
local function set(v)
  return v ~= nil and v ~= ''
end

-- The events of the hot paths (a connection opened or closed, a user online or
-- offline, a session ended) as emit writes them, but with no table: their values
-- are ids and reasons, and building and checking an argument table cost a kill
-- about 7,000 instructions per event. Any value nil or "" goes through emit.
local function emit_conn(P, B, what, uid, sid, cid, node, reason)
  if EVENTS_MAXLEN <= 0 then return end
  if not (set(uid) and set(sid) and set(cid) and set(node) and reason ~= '') then
    return emit(P, B, { what, 'user_id', uid, 'session_id', sid, 'connection_id', cid,
      'node_id', node, 'reason', reason })
  end
  if reason then
    append_event(P, B, what, 'user_id', uid, 'session_id', sid, 'connection_id', cid,
      'node_id', node, 'reason', reason)
  else
    append_event(P, B, what, 'user_id', uid, 'session_id', sid, 'connection_id', cid,
      'node_id', node)
  end
end

local function emit_user(P, B, what, uid)
  if EVENTS_MAXLEN <= 0 then return end
  if not set(uid) then return emit(P, B, { what, 'user_id', uid }) end
  append_event(P, B, what, 'user_id', uid)
end

-- session.ended for a session about to be ended by end_session (its connections'
-- connection.closed events come from drop_conn, first).
local function emit_ended(P, B, sid, uid, reason)
  if EVENTS_MAXLEN <= 0 then return end
  if not (set(uid) and set(sid) and set(reason)) then
    return emit(P, B, { 'session.ended', 'user_id', uid, 'session_id', sid, 'reason', reason })
  end
  append_event(P, B, 'session.ended', 'user_id', uid, 'session_id', sid, 'reason', reason)
end

-- How long a session's keys outlive its absolute expiry, so that sh_expire, which
-- tells the nodes, ends it before Redis drops the keys silently.
local EXPIRY_GRACE_MS = 60000

-- An integer as a command argument. A Lua number passed to redis.call is printed
-- with %.17g, which costs more than many commands; %d does not.
local function int(n)
  return string.format('%d', n)
end

-- When a session ends by itself.
local function deadline(expires_at, last_seen_at, idle_ms)
  return math.min(tonumber(expires_at), tonumber(last_seen_at) + tonumber(idle_ms))
end

-- Whether the session at key sk ran out by `now` (Unix ms; nil: not asked). Such a
-- session is the sweep's to end (as expired or idle): a kill leaves it alone and
-- answers as for one that is gone, as reading it does.
local function lapsed(sk, now)
  now = tonumber(now)
  if not now then return false end
  local f = redis.call('HMGET', sk, 'expires_at', 'last_seen_at', 'idle_ms')
  return f[1] ~= false and deadline(f[1], f[2], f[3]) <= now
end

local function bad_key(what)
  return redis.error_reply('BADKEY expected ' .. what)
end

-- The prefix, bucket and session id of a session key P{B}:session:<sid>, or nil.
local function parse_session_key(sk)
  local P, B, sid = string.match(sk, '^(.-){(%x%x)}:session:([0-9a-f]+)$')
  if not P or bucket_of(sid) ~= B then return nil end
  return P, B, sid
end

-- Constant-time comparison of two strings. Redis's Lua (5.1, in every Redis release)
-- interns every string: when a string is made (an argument, a reply's value), its
-- hash over all its bytes finds the one object with its bytes, so two strings are
-- equal exactly when they are the same object, and == compares two pointers, in the
-- same time whatever the bytes. (A byte-by-byte loop adds nothing: both strings are
-- interned before any comparison, and it cost a registration 14 % of its
-- instructions.)
local function ct_equal(a, b)
  return a == b
end

-- Whether a node may add records to bucket B under the lease it holds until
-- `lease_until`: the lease must be current and newer than any lease fenced off here
-- (a reaped node's, or a rejoined node's old one). Records the newest lease seen.
local function lease_ok(P, B, node, lease_until, now)
  lease_until = tonumber(lease_until)
  if not lease_until or lease_until <= now then return false end
  local lk = bkey(P, B, 'leases')
  local got = redis.call('HMGET', lk, node, 'fenced:' .. node)
  if lease_until <= tonumber(got[2] or '0') then return false end
  if lease_until > tonumber(got[1] or '0') then redis.call('HSET', lk, node, int(lease_until)) end
  return true
end

-- Records a live connection everywhere it is indexed. Idempotent.
local function add_conn(P, cid, sid, uid, node, at)
  local B = bucket_of(cid)
  local ck = conn_key(P, cid)
  if redis.call('EXISTS', ck) == 1 then return false end
  redis.call('HSET', ck, 'session_id', sid, 'user_id', uid, 'node_id', node, 'connected_at', at)
  redis.call('HSET', session_key(P, sid) .. ':conns', cid, node .. '|' .. at)
  redis.call('HSET', node_index(P, B, node), cid, sid)
  redis.call('HINCRBY', user_nodes_key(P, B, uid), node, '1')
  redis.call('HSET', user_conns_key(P, B, uid), cid, node)
  local live = redis.call('HINCRBY', bkey(P, B, 'online:conns'), uid, '1')
  redis.call('ZADD', bkey(P, B, 'online'), '0', uid)
  emit_conn(P, B, 'connection.opened', uid, sid, cid, node, nil)
  if live == 1 then emit_user(P, B, 'user.online', uid) end
  return true
end

-- Notes a group whose members in bucket B are all gone, so that the expiry sweep
-- can forget B in the group's bucket index (another slot, so not from here).
local function note_if_empty(P, B, group)
  if redis.call('EXISTS', bkey(P, B, 'group:' .. group)) == 0 then
    redis.call('HINCRBY', bkey(P, B, 'groups:emptied'), group, 1)
  end
end

-- Calls `cmd key item...` for the items of `list`, in chunks (unpack has a limit).
-- Returns the sum of the replies (commands that answer a count: HDEL, DEL, EXISTS).
local UNPACK_CHUNK = 512
local function call_chunked(cmd, key, list)
  local n = 0
  for i = 1, #list, UNPACK_CHUNK do
    if key then
      n = n + redis.call(cmd, key, unpack(list, i, math.min(i + UNPACK_CHUNK - 1, #list)))
    else
      n = n + redis.call(cmd, unpack(list, i, math.min(i + UNPACK_CHUNK - 1, #list)))
    end
  end
  return n
end

-- Removes every record of the given connections (all of bucket B), in one pass: the
-- indexes they share (their node's, their user's, the online counts) take one
-- command each rather than one per connection, which is most of a kill's time in
-- Redis. `why` is the connection.closed events' reason (default "closed"); a user
-- whose last connection went gets user.offline after them, and its per-node counts
-- and connection index go whole with the records (nothing of them is read). With
-- `session_going` the caller deletes the sessions' connection lists whole, so they
-- are not edited.
-- `also_del` (or nil) are more keys to delete with the records' own (one DEL).
-- `known` (or nil) is what the caller already knows of the records: a session's
-- {sid, uid, node = {cid -> node}}, from its connection list. add_conn writes a
-- record and its list entry with the same values, and nothing changes either after,
-- so when every record is there (one EXISTS) they are not read one by one; when one
-- is missing (an operator deleted it), each is read and the missing one skipped, as
-- without `known`. Likewise one EXISTS finds whether any connection is in a group.
-- Returns {node -> true} for the nodes that held them (unknown ones are skipped).
local function drop_conns(P, B, cids, why, session_going, known, also_del)
  local nodes, keys, by_node, users, order = {}, {}, {}, {}, {}
  local many = #cids > 1
  local cks, gks = {}, {}
  for i, cid in ipairs(cids) do
    cks[i] = conn_key(P, cid)
    gks[i] = cks[i] .. ':groups'
  end
  local all_there = known and many and call_chunked('EXISTS', nil, cks) == #cids
  local grouped = not many or call_chunked('EXISTS', nil, gks) > 0
  for i, cid in ipairs(cids) do
    local ck = cks[i]
    local sid, uid, node
    if all_there then
      sid, uid, node = known.sid, known.uid, known.node[cid]
    else
      local rec = redis.call('HMGET', ck, 'session_id', 'user_id', 'node_id')
      sid, uid, node = rec[1], rec[2], rec[3]
    end
    if sid then
      nodes[node] = true
      if not session_going then redis.call('HDEL', session_key(P, sid) .. ':conns', cid) end
      local list = by_node[node]
      if list then list[#list + 1] = cid else by_node[node] = { cid } end
      if grouped then
        for _, group in ipairs(redis.call('SMEMBERS', gks[i])) do
          redis.call('HDEL', bkey(P, B, 'group:' .. group), 'conn:' .. cid)
          note_if_empty(P, B, group)
        end
      end
      keys[#keys + 1] = ck
      keys[#keys + 1] = gks[i]
      emit_conn(P, B, 'connection.closed', uid, sid, cid, node, why or 'closed')
      local u = users[uid]
      if not u then
        u = { n = 0, nodes = {}, cids = {} }
        users[uid] = u
        order[#order + 1] = uid
      end
      u.n = u.n + 1
      u.nodes[node] = (u.nodes[node] or 0) + 1
      u.cids[#u.cids + 1] = cid
    end
  end
  if also_del then
    for _, key in ipairs(also_del) do keys[#keys + 1] = key end
  end
  if #keys == 0 then return nodes end
  for node, list in pairs(by_node) do call_chunked('HDEL', node_index(P, B, node), list) end
  local oc = bkey(P, B, 'online:conns')
  for _, uid in ipairs(order) do
    local u = users[uid]
    if redis.call('HINCRBY', oc, uid, int(-u.n)) <= 0 then
      -- The user's last sockets (the count covers every release's records): its
      -- per-node counts and its connection index go whole, in the DEL below.
      keys[#keys + 1] = user_nodes_key(P, B, uid)
      keys[#keys + 1] = user_conns_key(P, B, uid)
      redis.call('HDEL', oc, uid)
      redis.call('ZREM', bkey(P, B, 'online'), uid)
      emit_user(P, B, 'user.offline', uid)
    else
      -- The user's per-node counts: one read, then one write of those left and one
      -- removal of those gone, whatever the number of nodes.
      local un = user_nodes_key(P, B, uid)
      local names = {}
      for node in pairs(u.nodes) do names[#names + 1] = node end
      local had = redis.call('HMGET', un, unpack(names))
      local keep, gone = {}, {}
      for i, node in ipairs(names) do
        local left = (tonumber(had[i]) or 0) - u.nodes[node]
        if left > 0 then
          keep[#keep + 1] = node
          keep[#keep + 1] = int(left)
        else
          gone[#gone + 1] = node
        end
      end
      if #keep > 0 then redis.call('HSET', un, unpack(keep)) end
      if #gone > 0 then redis.call('HDEL', un, unpack(gone)) end
      call_chunked('HDEL', user_conns_key(P, B, uid), u.cids)
    end
  end
  call_chunked('DEL', nil, keys)
  return nodes
end

-- Removes every record of one connection. Returns its node, or nil if unknown.
local function drop_conn(P, cid, why)
  return next(drop_conns(P, bucket_of(cid), { cid }, why, false))
end

-- Ends one session: drops its connections and keys. Returns {node -> true}.
local function end_session(P, sid, uid)
  local sk = session_key(P, sid)
  local B = bucket_of(sid)
  local flat = redis.call('HGETALL', sk .. ':conns')
  local cids, node_of, complete = {}, {}, true
  for i = 1, #flat, 2 do
    local node = string.match(flat[i + 1], '^([^|]+)|')
    cids[#cids + 1] = flat[i]
    if node then node_of[flat[i]] = node else complete = false end
  end
  local known = complete and { sid = sid, uid = uid, node = node_of } or nil
  local nodes = drop_conns(P, B, cids, 'session_ended', true, known, { sk, sk .. ':conns' })
  -- A listed connection whose record is gone still had a socket on its node.
  for _, node in pairs(node_of) do nodes[node] = true end
  redis.call('HDEL', user_key(P, B, uid), sid)
  redis.call('ZREM', user_age_key(P, B, uid), sid)
  redis.call('ZREM', bkey(P, B, 'expiry'), sid)
  return nodes
end

local function publish_ended(P, B, per_node, reason)
  -- Session ids are hex; a reason of plain word characters needs no escaping, so the
  -- payload is written out (an operator's odd reason still goes through cjson).
  local plain = string.match(reason, '^[%w_]*$')
  for node, sids in pairs(per_node) do
    local payload
    if plain then
      payload = '{"t":"session_ended","session_ids":["' .. table.concat(sids, '","')
        .. '"],"reason":"' .. reason .. '"}'
    else
      payload = cjson.encode({ t = 'session_ended', session_ids = sids, reason = reason })
    end
    publish(P, B, node, payload)
  end
end

local function reason_arg(r)
  if r == nil or r == '' then return 'killed' end
  return r
end

-- Message history (see the layout above). The callers pass the history size, its
-- TTL and the meta key's TTL (ms); a size of 0, or none, keeps no history.
local HISTORY_META_TTL_MS = 24 * 3600 * 1000 -- when the caller gives none

local function history_key(P, B, uid)
  return P .. '{' .. B .. '}:user:' .. uid .. ':history'
end

-- The history size and TTLs from three arguments, or nil when history is off.
local function parse_history_cfg(size, ttl_ms, meta_ms)
  size, ttl_ms = tonumber(size or '0') or 0, tonumber(ttl_ms or '0') or 0
  if size <= 0 or ttl_ms <= 0 then return nil end
  meta_ms = tonumber(meta_ms or '') or HISTORY_META_TTL_MS
  -- The sizes and TTLs also as command arguments (see int).
  return { size = size, ttl_ms = ttl_ms, size_arg = int(size), ttl_arg = int(ttl_ms),
    meta_arg = int(math.max(ttl_ms, meta_ms)) }
end

-- The history size and TTLs from three arguments, or nil when history is off. The
-- nodes send the same three on every call, so the last answer is kept (read-only
-- for its users): parsing and printing the numbers again costs as much as a command.
local cfg_seen, cfg_size, cfg_ttl, cfg_meta, cfg_last = false, nil, nil, nil, nil
local function history_cfg(size, ttl_ms, meta_ms)
  if not (cfg_seen and size == cfg_size and ttl_ms == cfg_ttl and meta_ms == cfg_meta) then
    cfg_seen, cfg_size, cfg_ttl, cfg_meta = true, size, ttl_ms, meta_ms
    cfg_last = parse_history_cfg(size, ttl_ms, meta_ms)
  end
  return cfg_last
end

-- A new epoch: Redis's clock in microseconds, in hex (alphanumeric, as clients
-- must send it back).
local function new_epoch()
  local t = redis.call('TIME')
  return string.format('%x%05x', tonumber(t[1]), tonumber(t[2]))
end

-- The user's epoch and last offset, starting a new numbering if there is none. The
-- meta key's life is extended: a registered socket may come back for it.
local function history_meta(P, B, uid, cfg)
  local hk = history_key(P, B, uid)
  local mk = hk .. ':meta'
  local meta = redis.call('HMGET', mk, 'epoch', 'offset')
  local epoch, top = meta[1], tonumber(meta[2] or '0') or 0
  if not epoch then
    epoch, top = new_epoch(), 0
    redis.call('HSET', mk, 'epoch', epoch, 'offset', '0')
    redis.call('DEL', hk) -- entries of an older numbering
  end
  redis.call('PEXPIRE', mk, cfg.meta_arg)
  return epoch, top
end

-- Appends a client frame (a JSON object) to the user's history for audience `to`.
-- Returns the frame with "offset" spliced in, the offset, and the offset as text.
local function history_append(P, B, uid, cfg, to, frame)
  local hk = history_key(P, B, uid)
  local mk = hk .. ':meta'
  local off = redis.call('HINCRBY', mk, 'offset', '1')
  if off == 1 then
    -- A new numbering (or one begun by history_meta): it needs an epoch, and no
    -- entry of an older numbering may stay.
    redis.call('HSETNX', mk, 'epoch', new_epoch())
    redis.call('DEL', hk)
  end
  local o = string.format('%d', off)
  if string.match(frame, '^{%s*}$') then
    frame = '{"offset":"' .. o .. '"}'
  elseif string.sub(frame, -1) == '}' then
    frame = string.sub(frame, 1, -2) .. ',"offset":"' .. o .. '"}'
  end
  redis.call('XADD', hk, 'MAXLEN', cfg.size_arg, o .. '-0', 'at',
    redis_now_arg(), 'to', to, 'frame', frame)
  redis.call('PEXPIRE', hk, cfg.ttl_arg)
  redis.call('PEXPIRE', mk, cfg.meta_arg)
  return frame, off, o
end

-- What session `sid` may recover after offset `since` of history `epoch`: returns
-- 1 and {offset, frame, ...} if every entry after `since` is still there (none
-- trimmed or expired, same epoch), else 0 and {}.
local function history_recover(P, B, uid, sid, cfg, epoch, top, since, asked_epoch)
  since = tonumber(since)
  if asked_epoch ~= epoch or not since or since < 0 or since > top then return 0, {} end
  if since == top then return 1, {} end
  local entries = redis.call('XRANGE', history_key(P, B, uid),
    '(' .. string.format('%d', since) .. '-0', '+', 'COUNT', cfg.size)
  local first = entries[1]
  if not first or first[1] ~= string.format('%d', since + 1) .. '-0' then return 0, {} end
  local oldest = redis_now_ms() - cfg.ttl_ms
  local out = {}
  for i, e in ipairs(entries) do
    local f = {}
    for j = 1, #e[2], 2 do f[e[2][j]] = e[2][j + 1] end
    if i == 1 and (tonumber(f.at) or 0) < oldest then return 0, {} end
    local to = f.to or ''
    local who = string.match(to, '^%a+:(.*)$')
    if to == 'user' or (string.match(to, '^session:') and who == sid)
      or (string.match(to, '^others:') and who ~= sid) then
      table.insert(out, string.match(e[1], '^(%d+)-'))
      table.insert(out, f.frame)
    end
  end
  return 1, out
end

-- Adds (cid -> node) pairs of a session's live connections to `targets`.
local function session_targets(P, sid, targets)
  local conns = redis.call('HGETALL', session_key(P, sid) .. ':conns')
  for i = 1, #conns, 2 do
    targets[conns[i]] = string.match(conns[i + 1], '^([^|]+)|')
  end
end

local function user_targets(P, B, uid, targets)
  for _, sid in ipairs(redis.call('HKEYS', user_key(P, B, uid))) do
    session_targets(P, sid, targets)
  end
end

-- Publishes one client frame to sockets grouped by node ({node -> {cid, ...}}), one
-- event per node; `offset` (text, or nil) goes into the header.
local function publish_grouped(P, B, per_node, frame, offset)
  -- The header is written out rather than cjson-encoded: the ids are hex and the
  -- offset an integer, so nothing needs escaping.
  local o = offset and (',"o":' .. offset) or ''
  for node, cids in pairs(per_node) do
    -- One socket on the node (the common case) needs no joined list: every new
    -- string costs a hash of all its bytes.
    local list = cids[2] and table.concat(cids, '","') or cids[1]
    publish(P, B, node, '{"t":"message","cids":["' .. list .. '"]' .. o .. '}\n' .. frame)
  end
end

-- Publishes one client frame to the given sockets ({cid -> node}), one event per
-- node; `offset` (text, or nil) goes into the header. Returns {nodes, connections}.
local function publish_frame(P, B, targets, frame, offset)
  local per_node, nodes, conns = {}, 0, 0
  for cid, node in pairs(targets) do
    local cids = per_node[node]
    if cids then
      cids[#cids + 1] = cid
    else
      per_node[node] = { cid }
      nodes = nodes + 1
    end
    conns = conns + 1
  end
  publish_grouped(P, B, per_node, frame, offset)
  return nodes, conns
end

-- Publishes one client frame to the user's live sockets, found in
-- P{B}:user:<uid>:conns (its cost grows with the user's sockets, not its sessions).
-- Connections recorded before that index existed (by 0.2.0 nodes, in a rolling
-- upgrade) are missing from it: it then holds fewer than the user's live count in
-- P{B}:online:conns, which every release keeps, and the user's sessions are walked
-- instead. Returns {nodes, connections}.
local function publish_to_user(P, B, uid, frame, offset)
  local flat = redis.call('HGETALL', user_conns_key(P, B, uid))
  local counted = tonumber(redis.call('HGET', bkey(P, B, 'online:conns'), uid) or '0')
  if counted > #flat / 2 then
    local targets = {}
    user_targets(P, B, uid, targets)
    return publish_frame(P, B, targets, frame, offset)
  end
  -- Grouped by node straight from the index's pairs (cid, node).
  local per_node, nodes = {}, 0
  for i = 1, #flat, 2 do
    local node = flat[i + 1]
    local cids = per_node[node]
    if cids then
      cids[#cids + 1] = flat[i]
    else
      per_node[node] = { flat[i] }
      nodes = nodes + 1
    end
  end
  publish_grouped(P, B, per_node, frame, offset)
  return nodes, #flat / 2
end

-- sh_create_session: create a session and tell the user's other sessions.
--   KEYS[1] P{B}:session:<sid>   KEYS[2] P{B}:user:<uid>:sessions
--   ARGV user_id, secret_hash, user_agent, ip, now, expires_at, idle_ms,
--        [most sessions of the user (0 or absent: no cap), [deadline,
--        [session_created client frame, [history size, history TTL ms, meta TTL
--        ms]]]]
--   Returns the number of nodes notified; error EXISTS if the id is taken.
--   Past the cap, the user's oldest sessions end first, like kills with reason
--   "limit". With the client frame, it joins the user's history (audience
--   others:<sid>, when history is on) and goes as a "message" event to the user's
--   sockets (from P{B}:user:<uid>:conns, so the cost does not grow with the user's
--   sessions), like sh_publish's; without it (an older caller), each node holding a
--   socket of the user (P{B}:user:<uid>:nodes) gets
--   {"t":"session_created","session":{...}} (times as strings).
register('sh_create_session', function(keys, args)
  local sk, uk = keys[1], keys[2]
  local P, B, sid = parse_session_key(sk)
  if not P then return bad_key('P{B}:session:<id>') end
  if past_deadline(args[9]) then return deadline_reply() end
  if redis.call('EXISTS', sk) == 1 then return redis.error_reply('EXISTS session id taken') end
  local uid, now, expires, idle = args[1], args[5], args[6], args[7]
  local ak = user_age_key(P, B, uid)

  -- Sessions made before the age index existed join it once.
  if redis.call('ZCARD', ak) ~= redis.call('HLEN', uk) then
    for _, other in ipairs(redis.call('HKEYS', uk)) do
      local at = redis.call('HGET', session_key(P, other), 'created_at')
      if at then redis.call('ZADD', ak, 'NX', at, other) else redis.call('HDEL', uk, other) end
    end
  end
  local cap = tonumber(args[8] or '0') or 0
  if cap > 0 then
    local per_node = {}
    while redis.call('ZCARD', ak) >= cap do
      local oldest = redis.call('ZRANGE', ak, 0, 0)[1]
      if redis.call('EXISTS', session_key(P, oldest)) == 1 then
        emit_ended(P, B, oldest, uid, 'limit')
        for node in pairs(end_session(P, oldest, uid)) do
          per_node[node] = per_node[node] or {}
          table.insert(per_node[node], oldest)
        end
      else
        redis.call('ZREM', ak, oldest) -- expired on its own: tidy the indexes
        redis.call('HDEL', uk, oldest)
      end
    end
    publish_ended(P, B, per_node, 'limit')
  end

  redis.call('HSET', sk, 'user_id', uid, 'secret_hash', args[2], 'user_agent', args[3],
    'ip', args[4], 'created_at', now, 'last_seen_at', now, 'expires_at', expires,
    'idle_ms', idle)
  redis.call('PEXPIREAT', sk, int(tonumber(expires) + EXPIRY_GRACE_MS))
  redis.call('ZADD', bkey(P, B, 'expiry'), int(deadline(expires, now, idle)), sid)
  redis.call('HSET', uk, sid, expires)
  redis.call('ZADD', ak, now, sid)
  -- The indexes live as long as their longest-lived session (-1: no expiry yet).
  local keep_until = tonumber(expires) + EXPIRY_GRACE_MS
  for _, k in ipairs({ uk, ak }) do
    if redis.call('PEXPIRETIME', k) < keep_until then
      redis.call('PEXPIREAT', k, int(keep_until))
    end
  end

  emit(P, B, { 'session.created', 'user_id', uid, 'session_id', sid, 'user_agent', args[3], 'ip', args[4], 'expires_at', expires, 'idle_ms', idle })
  local created_frame = args[10]
  if created_frame and created_frame ~= '' then
    local offset = nil
    local cfg = history_cfg(args[11], args[12], args[13])
    if cfg then
      local _
      created_frame, _, offset = history_append(P, B, uid, cfg, 'others:' .. sid, created_frame)
    end
    return (publish_to_user(P, B, uid, created_frame, offset))
  end
  local nodes = redis.call('HKEYS', user_nodes_key(P, B, uid))
  if #nodes > 0 then
    local event = cjson.encode({ t = 'session_created', session = {
      session_id = sid, user_id = uid, user_agent = args[3], ip = args[4],
      created_at = now, last_seen_at = now, expires_at = expires, idle_ms = idle } })
    for _, node in ipairs(nodes) do
      publish(P, B, node, event)
    end
  end
  return #nodes
end)

-- sh_register_connection: check a token's secret and record a live connection, within
-- the socket limits; counts as activity of the session.
--   KEYS[1] P{B}:session:<sid>
--   ARGV secret_hash, connection_id, node_id, now, max sockets per session,
--        max sockets per user, the node's lease expiry, [deadline, [history size,
--        history TTL ms, meta TTL ms, [since, epoch]]]
--   Returns nil for no live session or a wrong secret, else {user_id, user_agent, ip,
--   created_at, last_seen_at, expires_at, idle_ms}, and with history on: epoch, the
--   last offset (every recoverable frame sent to this socket live has a higher one),
--   and when since was given: 1 or 0 (recovered or not), {offset, frame, ...} (the
--   entries after since this session may recover, in order). Errors: FENCED if the
--   node's lease has run out or was superseded, LIMIT if a socket limit is reached.
register('sh_register_connection', function(keys, args)
  local sk = keys[1]
  local P, B, sid = parse_session_key(sk)
  if not P then return bad_key('P{B}:session:<id>') end
  local cid, node, now = args[2], args[3], tonumber(args[4])
  if bucket_of(cid) ~= B then return redis.error_reply('BADARG connection id of another bucket') end
  if past_deadline(args[8]) then return deadline_reply() end
  local f = redis.call('HMGET', sk, 'secret_hash', 'user_id', 'user_agent', 'ip',
    'created_at', 'expires_at', 'last_seen_at', 'idle_ms')
  if not f[1] or not ct_equal(f[1], args[1]) then return false end
  if deadline(f[6], f[7], f[8]) <= now then return false end
  if redis.call('HLEN', sk .. ':conns') >= tonumber(args[5]) then
    return redis.error_reply('LIMIT too many sockets for this session (at most ' .. args[5] .. ')')
  end
  if tonumber(redis.call('HGET', bkey(P, B, 'online:conns'), f[2]) or '0') >= tonumber(args[6]) then
    return redis.error_reply('LIMIT too many sockets for this user (at most ' .. args[6] .. ')')
  end
  if not lease_ok(P, B, node, args[7], now) then
    return redis.error_reply('FENCED node holds no current lease')
  end
  add_conn(P, cid, sid, f[2], node, args[4])
  redis.call('HSET', sk, 'last_seen_at', args[4])
  redis.call('ZADD', bkey(P, B, 'expiry'), int(deadline(f[6], now, f[8])), sid)
  redis.call('PEXPIREAT', sk .. ':conns', int(tonumber(f[6]) + EXPIRY_GRACE_MS))
  local reply = { f[2], f[3], f[4], f[5], args[4], f[6], f[8] }
  local cfg = history_cfg(args[9], args[10], args[11])
  if cfg then
    -- In the same step as the record: frames up to `top` are history, later ones
    -- reach this socket live.
    local epoch, top = history_meta(P, B, f[2], cfg)
    table.insert(reply, epoch)
    table.insert(reply, string.format('%d', top))
    if args[12] and args[12] ~= '' then
      local ok, frames = history_recover(P, B, f[2], sid, cfg, epoch, top, args[12], args[13])
      table.insert(reply, ok)
      table.insert(reply, frames)
    end
  end
  return reply
end)

-- sh_touch: record activity of a session (its idle expiry moves).
--   KEYS[1] P{B}:session:<sid>   ARGV now, [deadline]
--   Returns 1, or 0 if there is no live session.
register('sh_touch', function(keys, args)
  local sk = keys[1]
  local P, B, sid = parse_session_key(sk)
  if not P then return bad_key('P{B}:session:<id>') end
  if past_deadline(args[2]) then return deadline_reply() end
  local now = tonumber(args[1])
  local f = redis.call('HMGET', sk, 'expires_at', 'last_seen_at', 'idle_ms')
  if not f[1] or deadline(f[1], f[2], f[3]) <= now then return 0 end
  redis.call('HSET', sk, 'last_seen_at', args[1])
  redis.call('ZADD', bkey(P, B, 'expiry'), int(deadline(f[1], now, f[3])), sid)
  return 1
end)

-- sh_expire: end every session of a bucket whose lifetime ran out, like a kill with
-- reason "expired" (session_ended to each node holding one of its sockets).
--   KEYS[1] P{B}:expiry   ARGV now, most sessions to look at in this call,
--   [forget_after_ms: lease fields of P{B}:leases older than this are removed],
--   [groups: "1" to also return up to 100 entries of P{B}:groups:emptied]
--   Returns the number of sessions ended; with groups "1", {ended, {group, count,
--   ...}}: for each, the caller forgets B in the group's bucket index, then calls
--   sh_group_emptied_done with the count.
register('sh_expire', function(keys, args)
  local P, B = split_key(keys[1])
  if not P or not string.match(keys[1], '}:expiry$') then return bad_key('P{B}:expiry') end
  local now = tonumber(args[1])
  local per_node, ended = {}, 0
  local due = redis.call('ZRANGE', keys[1], '-inf', now, 'BYSCORE', 'LIMIT', 0, tonumber(args[2]))
  for _, sid in ipairs(due) do
    local sk = session_key(P, sid)
    local f = redis.call('HMGET', sk, 'user_id', 'expires_at', 'last_seen_at', 'idle_ms')
    if not f[1] then
      redis.call('ZREM', keys[1], sid)
    else
      local d = deadline(f[2], f[3], f[4])
      if d > now then
        redis.call('ZADD', keys[1], d, sid) -- activity moved it; look again later
      else
        ended = ended + 1
        emit_ended(P, B, sid, f[1], tonumber(f[2]) <= now and 'expired' or 'idle')
        for node in pairs(end_session(P, sid, f[1])) do
          per_node[node] = per_node[node] or {}
          table.insert(per_node[node], sid)
        end
      end
    end
  end
  publish_ended(P, B, per_node, 'expired')
  -- A lease field (a node's newest lease here, or a fence) long in the past refuses
  -- nothing any more: a registration needs a current lease anyway. Forget it, so
  -- that node ids that came and went do not pile up.
  local forget = tonumber(args[3] or '0') or 0
  if forget > 0 then
    local lk = bkey(P, B, 'leases')
    local fields = redis.call('HGETALL', lk)
    for i = 1, #fields, 2 do
      if tonumber(fields[i + 1]) and tonumber(fields[i + 1]) + forget < now then
        redis.call('HDEL', lk, fields[i])
      end
    end
  end
  if args[4] == '1' then
    return { ended, redis.call('HRANDFIELD', bkey(P, B, 'groups:emptied'), 100, 'WITHVALUES') }
  end
  return ended
end)

-- sh_group_emptied_done: the sweep has dealt with a group's emptying in bucket B,
-- as of `count`; a later emptying (a higher count) stays for the next sweep.
--   KEYS[1] P{B}:groups:emptied   ARGV group, count
--   Returns 1 if the entry went.
register('sh_group_emptied_done', function(keys, args)
  if not string.match(keys[1], '}:groups:emptied$') then return bad_key('P{B}:groups:emptied') end
  if redis.call('HGET', keys[1], args[1]) ~= args[2] then return 0 end
  redis.call('HDEL', keys[1], args[1])
  return 1
end)

-- sh_group_forget_bucket: forget bucket B in a group's bucket index, unless a member
-- was added there since the caller read `adds` (before it saw the group's members in
-- B gone). The adder bumps the counter after its sh_group_add, so an add racing the
-- sweep either shows in the count, or comes after this call and puts B back.
--   KEYS[1] Pgroup:<group>:in_buckets   ARGV B, adds
--   Returns 1 if forgotten.
register('sh_group_forget_bucket', function(keys, args)
  if not string.match(keys[1], 'group:.+:in_buckets$') then return bad_key('Pgroup:<group>:in_buckets') end
  if redis.call('HGET', keys[1], args[1]) ~= args[2] then return 0 end
  redis.call('HDEL', keys[1], args[1])
  return 1
end)

-- sh_unregister_connection: remove a closed connection's records (and its groups).
--   KEYS[1] P{B}:conn:<cid>
--   Returns 1 if there was a record, else 0.
register('sh_unregister_connection', function(keys, args)
  local P, B = split_key(keys[1])
  local cid = string.match(keys[1], '}:conn:([0-9a-f]+)$')
  if not P or not cid or bucket_of(cid) ~= B then return bad_key('P{B}:conn:<id>') end
  if drop_conn(P, cid) then return 1 end
  return 0
end)

-- sh_kill_session: end one session everywhere.
--   KEYS[1] P{B}:session:<sid>
--   ARGV reason (killed | logout | expired; default killed), owner user_id or ""
--   (a session of another user is treated exactly like an unknown one), [deadline],
--   [now: a session whose lifetime ran out by then is treated as gone too]
--   Returns 1 if ended, 0 if there was none. Publishes
--   {"t":"session_ended","session_ids":[sid],"reason":...} to each node holding one
--   of its sockets.
register('sh_kill_session', function(keys, args)
  local sk = keys[1]
  local P, B, sid = parse_session_key(sk)
  if not P then return bad_key('P{B}:session:<id>') end
  if past_deadline(args[3]) then return deadline_reply() end
  local owner = args[2] or ''
  local uid = redis.call('HGET', sk, 'user_id')
  if not uid then return 0 end
  if owner ~= '' and owner ~= uid then return 0 end
  if lapsed(sk, args[4]) then return 0 end
  local per_node = {}
  emit_ended(P, B, sid, uid, reason_arg(args[1]))
  for node in pairs(end_session(P, sid, uid)) do per_node[node] = { sid } end
  publish_ended(P, B, per_node, reason_arg(args[1]))
  return 1
end)

-- sh_kill_user_sessions: end every session of a user but one.
--   KEYS[1] P{B}:user:<uid>:sessions
--   ARGV reason (default killed), session_id to keep or "", [deadline], [now: sessions
--   whose lifetime ran out by then are left to the sweep, and not counted]
--   Returns the number of sessions ended; one session_ended event per node.
register('sh_kill_user_sessions', function(keys, args)
  local uk = keys[1]
  local P, B = split_key(uk)
  local uid = string.match(uk, '}:user:(.*):sessions$')
  if not P or not uid then return bad_key('P{B}:user:<uid>:sessions') end
  if past_deadline(args[3]) then return deadline_reply() end
  local keep = args[2] or ''
  local per_node, killed = {}, 0
  for _, sid in ipairs(redis.call('HKEYS', uk)) do
    if sid ~= keep and not lapsed(session_key(P, sid), args[4]) then
      if redis.call('EXISTS', session_key(P, sid)) == 1 then
        killed = killed + 1
        emit_ended(P, B, sid, uid, reason_arg(args[1]))
        for node in pairs(end_session(P, sid, uid)) do
          per_node[node] = per_node[node] or {}
          table.insert(per_node[node], sid)
        end
      end
      redis.call('HDEL', uk, sid)
      redis.call('ZREM', user_age_key(P, B, uid), sid)
    end
  end
  publish_ended(P, B, per_node, reason_arg(args[1]))
  return killed
end)

-- sh_user_sessions: a user's live sessions with their connections.
--   KEYS[1] P{B}:user:<uid>:sessions
--   Returns per session {session_id, user_agent, ip, created_at, last_seen_at,
--   expires_at, idle_ms, {connection_id, "<node>|<connected_at>", ...}}; index entries
--   of sessions whose keys are gone are removed on the way.
register('sh_user_sessions', function(keys, args)
  local uk = keys[1]
  local P, B = split_key(uk)
  local uid = string.match(uk, '}:user:(.*):sessions$')
  if not P or not uid then return bad_key('P{B}:user:<uid>:sessions') end
  local out = {}
  for _, sid in ipairs(redis.call('HKEYS', uk)) do
    local sk = session_key(P, sid)
    local f = redis.call('HMGET', sk, 'user_agent', 'ip', 'created_at', 'last_seen_at',
      'expires_at', 'idle_ms')
    if not f[3] then
      redis.call('HDEL', uk, sid)
      redis.call('ZREM', user_age_key(P, B, uid), sid)
    else
      table.insert(out, { sid, f[1], f[2], f[3], f[4], f[5], f[6], redis.call('HGETALL', sk .. ':conns') })
    end
  end
  return out
end)

-- Publishes a client frame to the sockets of one target key of bucket B (as
-- sh_publish's KEYS[1]); with `cfg`, a frame for a user or a session joins the
-- user's history. Returns nodes, connections, offset (or nil); nil for a key of
-- another kind.
-- `uid`: the user of a user key if the caller has matched it already (false: the
-- key is known to be no user key; nil: not matched yet).
local function publish_target(P, B, key, frame, cfg, uid)
  local offset, offset_text = nil, nil
  if uid == nil then uid = string.match(key, '}:user:(.*):sessions$') end
  if uid then
    if cfg then frame, offset, offset_text = history_append(P, B, uid, cfg, 'user', frame) end
    local nodes, conns = publish_to_user(P, B, uid, frame, offset_text)
    return nodes, conns, offset
  end
  local targets = {}
  if string.match(key, '}:session:[0-9a-f]+$') then
    local sid = string.match(key, 'session:([0-9a-f]+)$')
    local owner = cfg and redis.call('HGET', key, 'user_id')
    if owner then
      frame, offset, offset_text = history_append(P, B, owner, cfg, 'session:' .. sid, frame)
    end
    session_targets(P, sid, targets)
  elseif string.match(key, '}:conn:[0-9a-f]+$') then
    local node = redis.call('HGET', key, 'node_id')
    if node then targets[string.match(key, ':conn:([0-9a-f]+)$')] = node end
  elseif string.match(key, '}:group:.+$') then
    local members = redis.call('HKEYS', key)
    for _, m in ipairs(members) do
      local kind, id = string.match(m, '^(%a+):(.+)$')
      if kind == 'conn' then
        local node = redis.call('HGET', conn_key(P, id), 'node_id')
        if node then targets[id] = node end
      elseif kind == 'user' then
        user_targets(P, B, id, targets)
      end
    end
  else
    return nil
  end
  local nodes, conns = publish_frame(P, B, targets, frame, offset_text)
  return nodes, conns, offset
end

-- Whether `key`, no user key, names something else publish_target can publish to.
local function is_other_target(key)
  return string.match(key, '}:session:[0-9a-f]+$') or string.match(key, '}:conn:[0-9a-f]+$')
    or string.match(key, '}:group:.+$')
end

local function delivery_reply(nodes, conns, offset)
  if offset then return { nodes, conns, offset } end
  return { nodes, conns }
end

-- sh_publish: send a client frame to every live socket of a target, on every node.
--   KEYS[1] the target: P{B}:user:<uid>:sessions | P{B}:session:<sid> |
--           P{B}:conn:<cid> | P{B}:group:<group> (the group's members in bucket B)
--   ARGV frame (the complete client text frame), [deadline, [history size, history
--        TTL ms, meta TTL ms]]
--   Returns {nodes, connections} reached, and the frame's offset when it joined the
--   history (a message to a user or a session, with history on). Publishes to each
--   node that holds a target socket: '{"t":"message","cids":[...],"o":offset}' ..
--   "\n" .. frame (o only for a recoverable frame, which carries "offset" too)
register('sh_publish', function(keys, args)
  local key, frame = keys[1], args[1]
  local P, B = split_key(key)
  if not P then return bad_key('a user, session, connection or group key') end
  if past_deadline(args[2]) then return deadline_reply() end
  local nodes, conns, offset = publish_target(P, B, key, frame, history_cfg(args[3], args[4], args[5]))
  if not nodes then return bad_key('a user, session, connection or group key') end
  return delivery_reply(nodes, conns, offset)
end)

-- sh_publish_batch: sh_publish for several targets, in their order, in one call. On
-- Redis Cluster they must be of one bucket B (one slot; a batch publish makes one
-- call per bucket it touches); on one Redis they may be of any buckets (a batch
-- publish makes one call per 64 targets).
--   KEYS the targets, as sh_publish's KEYS[1], of one prefix (and on Redis Cluster
--        of one bucket)
--   ARGV deadline (or ""), history size, history TTL ms, meta TTL ms (0 0 0: no
--        history), then one frame per key
--   Returns one {nodes, connections[, offset]} per key, in order.
register('sh_publish_batch', function(keys, args)
  if #keys == 0 or #args ~= #keys + 4 then
    return redis.error_reply('BADARG sh_publish_batch takes 4 arguments and one frame per key')
  end
  local P, B = split_key(keys[1])
  if not P then return bad_key('a user, session, connection or group key') end
  local one_bucket = in_cluster()
  local buckets, uids = {}, {}
  for i, key in ipairs(keys) do
    local kp, kb = split_key(key)
    if kp ~= P then return redis.error_reply('BADARG every key of a batch must have one prefix') end
    if one_bucket and kb ~= B then
      return redis.error_reply('BADARG every key of a batch must be in one bucket on Redis Cluster')
    end
    -- Every key is checked before the first message goes out: a bad one refuses
    -- the whole call, with nothing published or written to history. (A user key,
    -- the usual one, is matched once: publish_target takes the match.)
    uids[i] = string.match(key, '}:user:(.*):sessions$') or false
    if not uids[i] and not is_other_target(key) then
      return bad_key('a user, session, connection or group key')
    end
    buckets[i] = kb
  end
  if past_deadline(args[1]) then return deadline_reply() end
  local cfg = history_cfg(args[2], args[3], args[4])
  local out = {}
  for i, key in ipairs(keys) do
    local nodes, conns, offset = publish_target(P, buckets[i], key, args[4 + i], cfg, uids[i])
    if not nodes then return bad_key('a user, session, connection or group key') end
    out[i] = delivery_reply(nodes, conns, offset)
  end
  return out
end)

-- sh_group_add: add a connection or a user (its current and future connections) to
-- the group's members in the member's bucket. The caller then bumps B's count in
-- Pgroup:<group>:in_buckets (HINCRBY), so that publishing to the group finds the
-- bucket.
--   KEYS[1] P{B}:group:<group>
--   ARGV "conn", connection_id, now   |   "user", user_id, now; then [deadline]
--   Returns 1, or 0 if the connection is not live.
register('sh_group_add', function(keys, args)
  local P, B = split_key(keys[1])
  local group = string.match(keys[1], '}:group:(.+)$')
  if not P or not group then return bad_key('P{B}:group:<group>') end
  if past_deadline(args[4]) then return deadline_reply() end
  -- Checked before any write: a call without the time would fail at its HSET,
  -- after the SADD (a function's writes are not undone by an error).
  if not args[2] or not tonumber(args[3]) then
    return redis.error_reply('BADARG sh_group_add takes a kind, an id and the time')
  end
  if args[1] == 'conn' then
    if bucket_of(args[2]) ~= B then return redis.error_reply('BADARG connection of another bucket') end
    local ck = conn_key(P, args[2])
    if redis.call('EXISTS', ck) == 0 then return 0 end
    redis.call('SADD', ck .. ':groups', group)
    redis.call('HSET', keys[1], 'conn:' .. args[2], args[3])
  elseif args[1] == 'user' then
    redis.call('HSET', keys[1], 'user:' .. args[2], args[3])
  else
    return redis.error_reply('BADARG member kind must be conn or user')
  end
  return 1
end)

-- sh_group_remove: remove a member.
--   KEYS[1] P{B}:group:<group>   ARGV "conn"|"user", id, [deadline]
--   Returns 1 if it was a member, else 0.
register('sh_group_remove', function(keys, args)
  local P, B = split_key(keys[1])
  local group = string.match(keys[1], '}:group:(.+)$')
  if not P or not group then return bad_key('P{B}:group:<group>') end
  if past_deadline(args[3]) then return deadline_reply() end
  if args[1] == 'conn' and bucket_of(args[2]) == B then
    redis.call('SREM', conn_key(P, args[2]) .. ':groups', group)
  end
  local n = redis.call('HDEL', keys[1], args[1] .. ':' .. args[2])
  note_if_empty(P, B, group)
  return n
end)

-- sh_drop_node: drop a node's records in one bucket and fence off its registrations
-- under leases up to `upto` (the lease that expired, or the node's own old lease when
-- it rejoins or leaves). Records made under a newer lease (the node rejoined since)
-- are kept. Reaping a node calls this for every bucket.
--   KEYS[1] P{B}:node:<node>:conns   ARGV upto
--   Returns the number of connection records dropped.
register('sh_drop_node', function(keys, args)
  local P, B = split_key(keys[1])
  local node = string.match(keys[1], '}:node:(.+):conns$')
  if not P or not node then return bad_key('P{B}:node:<node>:conns') end
  local upto = tonumber(args[1])
  if not upto then return redis.error_reply('BADARG upto must be a number') end
  local lk = bkey(P, B, 'leases')
  local got = redis.call('HMGET', lk, node, 'fenced:' .. node)
  if tonumber(got[1] or '0') > upto then return 0 end
  if upto > tonumber(got[2] or '0') then redis.call('HSET', lk, 'fenced:' .. node, upto) end
  local cids = redis.call('HKEYS', keys[1])
  drop_conns(P, B, cids, 'node_dropped', false)
  redis.call('DEL', keys[1])
  return #cids
end)

-- sh_node_join: take a lease for a node.
--   KEYS[1] Pnodes   ARGV node_id, now, lease_ms, floor (the lease must end after it)
--   Returns the lease's expiry.
register('sh_node_join', function(keys, args)
  if not string.match(keys[1], 'nodes$') then return bad_key('Pnodes') end
  local lease = math.max(tonumber(args[2]) + tonumber(args[3]), tonumber(args[4]) + 1)
  redis.call('ZADD', keys[1], lease, args[1])
  return lease
end)

-- sh_node_heartbeat: renew a node's lease.
--   KEYS[1] Pnodes   ARGV node_id, now, lease_ms
--   Returns the new expiry; 0 if the lease had expired or was reaped: the node is
--   fenced, and must drop its records and rejoin.
register('sh_node_heartbeat', function(keys, args)
  if not string.match(keys[1], 'nodes$') then return bad_key('Pnodes') end
  local node, now = args[1], tonumber(args[2])
  local exp = redis.call('ZSCORE', keys[1], node)
  if not exp or tonumber(exp) <= now then return 0 end
  local lease = now + tonumber(args[3])
  redis.call('ZADD', keys[1], lease, node)
  return lease
end)

-- sh_node_claim: take or renew a node id for one process (by its random nonce), so
-- that two processes never run under one id: a second node started by mistake with
-- the id of a running one, or a node that resumes after another process took its id
-- while it was paused. The claim lapses `ttl_ms` after its last renewal (a node
-- renews it with every heartbeat), so a restart after a crash waits at most that.
--   KEYS[1] Pnode-claim:<node_id>   ARGV nonce, ttl_ms
--   Returns 0 if the process holds the id now; else the ms left on another
--   process's claim (at least 1; -1 when it was set without a TTL).
register('sh_node_claim', function(keys, args)
  if not string.match(keys[1], 'node%-claim:.') then return bad_key('Pnode-claim:<node_id>') end
  local ttl = tonumber(args[2])
  if not args[1] or args[1] == '' or not ttl or ttl < 1 then
    return redis.error_reply('BADARG nonce and ttl_ms (> 0) expected')
  end
  local holder = redis.call('GET', keys[1])
  if holder and holder ~= args[1] then
    local left = redis.call('PTTL', keys[1])
    if left == -1 then return -1 end
    return math.max(left, 1)
  end
  redis.call('SET', keys[1], args[1], 'PX', int(ttl))
  return 0
end)

-- sh_node_release: give up a node id's claim when the node leaves.
--   KEYS[1] Pnode-claim:<node_id>   ARGV nonce
--   Returns 1 if this process held it (now released), else 0.
register('sh_node_release', function(keys, args)
  if not string.match(keys[1], 'node%-claim:.') then return bad_key('Pnode-claim:<node_id>') end
  if redis.call('GET', keys[1]) ~= args[1] then return 0 end
  redis.call('DEL', keys[1])
  return 1
end)

-- sh_node_forget: remove a node's lease once its records are dropped from every
-- bucket, unless it has taken a new lease meanwhile.
--   KEYS[1] Pnodes   ARGV node_id, the lease expiry that was dropped
--   Returns 1 if removed.
register('sh_node_forget', function(keys, args)
  if not string.match(keys[1], 'nodes$') then return bad_key('Pnodes') end
  local exp = redis.call('ZSCORE', keys[1], args[1])
  if not exp or tonumber(exp) > tonumber(args[2]) then return 0 end
  redis.call('ZREM', keys[1], args[1])
  return 1
end)

-- sh_reassert: after a resubscription or a new lease, put back the records of a
-- node's live sockets in one bucket whose sessions still exist (Redis may have lost
-- them), and find the sockets that missed recoverable frames meanwhile (published
-- while the node was not subscribed: they reached none of its sockets).
--   KEYS[1] P{B}:node:<node>:conns   ARGV lease expiry, now, "history", history
--   size, history TTL ms, meta TTL ms, then per socket: cid, sid, user_id,
--   connected_at, the history epoch and the last offset the socket got ("" and "":
--   none; all of bucket B)
--   Returns {session ids (one per socket) that no longer exist, connection ids of
--   sockets whose session may recover frames after their offset, or whose user's
--   history was renumbered since, or lost offsets the socket got (its numbering is
--   restarted then)}.
--   The form of 0.2 nodes, which call the shared library's plain names (still read,
--   for a rolling upgrade from 0.2): ARGV lease expiry, now, then per socket cid,
--   sid, user_id, connected_at; returns the session ids alone.
--   Error FENCED if the node's lease has run out or was superseded.
register('sh_reassert', function(keys, args)
  local P, B = split_key(keys[1])
  local node = string.match(keys[1], '}:node:(.+):conns$')
  if not P or not node then return bad_key('P{B}:node:<node>:conns') end
  local now = tonumber(args[2])
  if not lease_ok(P, B, node, args[1], now) then
    return redis.error_reply('FENCED node holds no current lease')
  end
  local with_history = args[3] == 'history'
  local cfg, first, step = nil, 3, 4
  if with_history then
    cfg, first, step = history_cfg(args[4], args[5], args[6]), 7, 6
  end
  local gone, missed = {}, {}
  for i = first, #args, step do
    local cid, sid, uid, at = args[i], args[i + 1], args[i + 2], args[i + 3]
    if bucket_of(cid) == B and redis.call('EXISTS', session_key(P, sid)) == 1 then
      if add_conn(P, cid, sid, uid, node, at) then
        -- The session's socket list lives as long as the session, as a registration
        -- leaves it (it may be made afresh here, after Redis lost it).
        local expires = redis.call('HGET', session_key(P, sid), 'expires_at')
        redis.call('PEXPIREAT', session_key(P, sid) .. ':conns', int(tonumber(expires) + EXPIRY_GRACE_MS))
      end
      local epoch, seen = args[i + 4], tonumber(args[i + 5] or '')
      if cfg and epoch ~= '' and seen then
        local meta = redis.call('HMGET', history_key(P, B, uid) .. ':meta', 'epoch', 'offset')
        local now_epoch, top = meta[1], tonumber(meta[2] or '0') or 0
        -- No numbering now: nothing was published since the socket's one expired.
        if now_epoch and now_epoch ~= epoch then
          table.insert(missed, cid)
        elseif now_epoch and top < seen then
          -- Redis lost its newest writes (restarted from an AOF or snapshot that
          -- was behind, or failed over to a replica that was): the offsets after
          -- `top` would be given again to other frames. A new numbering, and the
          -- socket (whose client holds offsets of the lost one) is told it missed.
          local hk = history_key(P, B, uid)
          redis.call('HSET', hk .. ':meta', 'epoch', new_epoch(), 'offset', '0')
          redis.call('DEL', hk)
          table.insert(missed, cid)
        elseif now_epoch and top > seen then
          local ok, frames = history_recover(P, B, uid, sid, cfg, now_epoch, top, args[i + 5], epoch)
          if ok == 0 or #frames > 0 then table.insert(missed, cid) end
        end
      end
    else
      table.insert(gone, sid)
    end
  end
  if not with_history then return gone end
  return { gone, missed }
end)

-- sh_reconcile: remove a node's records in one bucket that it does not hold: the
-- node passes the connections it holds in B; any other record of the node in B that
-- is older than `before` goes (younger ones may belong to an upgrade in flight).
--   KEYS[1] P{B}:node:<node>:conns   ARGV before (Unix ms), then connection ids
--   Returns the number of records removed.
register('sh_reconcile', function(keys, args)
  local P, B = split_key(keys[1])
  local node = string.match(keys[1], '}:node:(.+):conns$')
  if not P or not node then return bad_key('P{B}:node:<node>:conns') end
  local before = tonumber(args[1])
  if not before then return redis.error_reply('BADARG before must be a number') end
  local held = {}
  for i = 2, #args do held[args[i]] = true end
  local n = 0
  for _, cid in ipairs(redis.call('HKEYS', keys[1])) do
    if not held[cid] then
      local at = tonumber(redis.call('HGET', conn_key(P, cid), 'connected_at') or '0') or 0
      if at < before then
        if not drop_conn(P, cid, 'reconciled') then redis.call('HDEL', keys[1], cid) end
        n = n + 1
      end
    end
  end
  return n
end)

-- sh_online_users: one page of a bucket's online users, in lexical order (a full
-- page merges the pages of all buckets).
--   KEYS[1] P{B}:online   ARGV after (exclusive; "" for the first page), limit,
--   [prefix: only user ids that start with it]
--   Returns {user_id, connections, ...}.
register_with{
  function_name = 'sh_online_users',
  flags = { 'no-writes' },
  callback = function(keys, args)
    local P, B = split_key(keys[1])
    if not P or not string.match(keys[1], '}:online$') then return bad_key('P{B}:online') end
    local from, to = '-', '+'
    if args[1] ~= '' then from = '(' .. args[1] end
    local prefix = args[3] or ''
    if prefix ~= '' then
      -- User ids are ASCII, so prefix .. "\255" is past every id that starts with it.
      if args[1] == '' or args[1] < prefix then from = '[' .. prefix end
      to = '[' .. prefix .. '\255'
    end
    local users = redis.call('ZRANGE', keys[1], from, to, 'BYLEX', 'LIMIT', 0, tonumber(args[2]))
    local out = {}
    local oc = bkey(P, B, 'online:conns')
    for _, uid in ipairs(users) do
      table.insert(out, uid)
      table.insert(out, tonumber(redis.call('HGET', oc, uid) or '0'))
    end
    return out
  end,
}

-- sh_presence_counts: a bucket's {online users, live connections on the given nodes}.
--   KEYS[1] P{B}:online   ARGV node ids
register_with{
  function_name = 'sh_presence_counts',
  flags = { 'no-writes' },
  callback = function(keys, args)
    local P, B = split_key(keys[1])
    if not P or not string.match(keys[1], '}:online$') then return bad_key('P{B}:online') end
    local conns = 0
    for _, node in ipairs(args) do
      conns = conns + redis.call('HLEN', node_index(P, B, node))
    end
    return { redis.call('ZCARD', keys[1]), conns }
  end,
}

-- sh_events_take: the next batch of a bucket's events for a webhook consumer group,
-- handed to one consumer at a time, so that the bucket's events (and so each user's)
-- are delivered in order, by one node at a time.
--   KEYS[1] P{B}:events   ARGV group, consumer, count, claim_idle_ms
--   Returns {"new"|"mine", entries, deleted ids}: entries (id, fields) the consumer
--   now holds: its own pending ones again (a retry; their idle time restarts), those
--   of another consumer idle for claim_idle_ms or more (a node that died
--   mid-delivery: XAUTOCLAIM), or else new ones (XREADGROUP); "deleted ids": pending
--   entries the stream's cap trimmed away before delivery[, and for "new" the number
--   of entries it trimmed away before the group read them]. {"busy", ms}: another
--   consumer holds this bucket's batch, claimable in ms if it stays idle. With nothing
--   pending and nothing new, consumers idle for claim_idle_ms or more are forgotten
--   (forget_idle_consumers). The nodes
--   create the group at the stream's end when they start delivering (XGROUP CREATE
--   ... $ MKSTREAM); if it is missing here (Redis restarted empty, an operator
--   removed it), it is created at the stream's start: nothing written is skipped.
-- Forgets the consumers of a group that has nothing pending, but for `me`, that
-- have been idle for `idle_ms` or more. A consumer is a node id, new at every start
-- of a node: without this the group's list grew by one per node start, for good.
-- Forgetting a consumer that holds nothing loses nothing (XREADGROUP makes it again
-- if its node is still there).
local function forget_idle_consumers(sk, group, me, idle_ms)
  for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', sk, group)) do
    local f = {}
    for i = 1, #c, 2 do f[c[i]] = c[i + 1] end
    if f.name ~= me and tonumber(f.pending) == 0 and tonumber(f.idle) >= idle_ms then
      redis.call('XGROUP', 'DELCONSUMER', sk, group, f.name)
    end
  end
end

-- How many of the stream's entries its cap trimmed away before group `group` read
-- them; the group's read counter is then moved past them, so each is counted once.
-- (The counter is Redis's `entries-read`: a group reading on after a trim counts one
-- per entry read, not the ones trimmed.) 0 when Redis cannot tell (an invalid
-- counter).
local function trimmed_unread(sk, group)
  local info = redis.call('XINFO', 'STREAM', sk)
  local st = {}
  for i = 1, #info, 2 do st[info[i]] = info[i + 1] end
  local removed = tonumber(st['entries-added']) - tonumber(st['length'])
  for _, g in ipairs(redis.call('XINFO', 'GROUPS', sk)) do
    local f = {}
    for i = 1, #g, 2 do f[g[i]] = g[i + 1] end
    if f.name == group then
      local read = tonumber(f['entries-read'])
      if not read or removed <= read then return 0 end
      redis.call('XGROUP', 'SETID', sk, group, f['last-delivered-id'], 'ENTRIESREAD', removed)
      return removed - read
    end
  end
  return 0
end

register('sh_events_take', function(keys, args)
  local sk, group, me, count, claim = keys[1], args[1], args[2], tonumber(args[3]), tonumber(args[4])
  if not string.match(sk, '}:events$') then return bad_key('P{B}:events') end
  local first = redis.pcall('XPENDING', sk, group, '-', '+', 1)
  if type(first) == 'table' and first.err then
    if not string.match(first.err, '^NOGROUP') then return first end
    redis.call('XGROUP', 'CREATE', sk, group, '0', 'MKSTREAM')
    first = {}
  end
  if #first > 0 then
    local owner, idle = first[1][2], tonumber(first[1][3])
    if owner ~= me and idle < claim then return { 'busy', claim - idle } end
    local got = redis.call('XAUTOCLAIM', sk, group, me, 0, '0-0', 'COUNT', count)
    return { 'mine', got[2], got[3] or {} }
  end
  local skipped = trimmed_unread(sk, group)
  local got = redis.call('XREADGROUP', 'GROUP', group, me, 'COUNT', count, 'STREAMS', sk, '>')
  if not got then
    -- Nothing pending and nothing new: the bucket's delivery is idle.
    forget_idle_consumers(sk, group, me, claim)
    return { 'new', {}, {}, skipped }
  end
  return { 'new', got[1][2], {}, skipped }
end)
-- The sweep index. Psweep (no hash tag) is a zset: bucket (two hex digits) -> the
-- earliest time the bucket may need an sh_expire call (a session may end, a lease
-- field or an emptied group may be ready to forget). It is a lower bound: a bucket
-- that needs nothing before its score may still be swept at it, never later. Nodes
-- write it with ZADD LT after the calls that make such work (a login, a node's
-- records dropped, a registration's lease field), and sweep only buckets whose score
-- has come, so an idle cluster reads one key a second instead of every bucket. It
-- spans slots, so the functions of one bucket never write it: the node does, after
-- them (see README, "Redis layout").

-- sh_sweep_claim: take the buckets whose time has come, for one sweeper: their score
-- moves to `until`, so other nodes leave them alone meanwhile (and take them again
-- after `until` if this one died).
--   KEYS[1] Psweep   ARGV now, until, most buckets
--   Returns the buckets claimed.
register('sh_sweep_claim', function(keys, args)
  if not string.match(keys[1], 'sweep$') then return bad_key('Psweep') end
  local due = redis.call('ZRANGE', keys[1], '-inf', tonumber(args[1]), 'BYSCORE', 'LIMIT', 0,
    tonumber(args[3]))
  for _, b in ipairs(due) do
    redis.call('ZADD', keys[1], tonumber(args[2]), b)
  end
  return due
end)

-- sh_sweep_next: when bucket B next needs sh_expire: its earliest session deadline,
-- its oldest lease field plus `forget_after_ms` (sh_expire's own argument) plus 1,
-- or 0 (now) if an emptied group waits in P{B}:groups:emptied.
--   KEYS[1] P{B}:expiry   ARGV forget_after_ms
--   Returns that time (Unix ms), or -1 if the bucket needs nothing.
register_with{
  function_name = 'sh_sweep_next',
  flags = { 'no-writes' },
  callback = function(keys, args)
    local P, B = split_key(keys[1])
    if not P or not string.match(keys[1], '}:expiry$') then return bad_key('P{B}:expiry') end
    if redis.call('EXISTS', bkey(P, B, 'groups:emptied')) == 1 then return 0 end
    local next = nil
    local first = redis.call('ZRANGE', keys[1], 0, 0, 'WITHSCORES')
    if first[2] then next = tonumber(first[2]) end
    local forget = tonumber(args[1] or '0') or 0
    if forget > 0 then
      local fields = redis.call('HGETALL', bkey(P, B, 'leases'))
      for i = 2, #fields, 2 do
        local at = tonumber(fields[i])
        if at and (next == nil or at + forget + 1 < next) then next = at + forget + 1 end
      end
    end
    if next == nil then return -1 end
    return math.floor(next)
  end,
}
