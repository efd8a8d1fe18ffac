"""Server-side scripts of the Redis broker. Each runs atomically in Redis.

Keys of one channel share the hash tag ``{channel}``, so on Redis Cluster they
live in one slot and a script may touch them all (and SPUBLISH on the
channel's pub/sub name, which hashes to the same slot).

A stream's history is a Redis stream whose entry ids are ``<offset>-1``, so a
range of offsets is one XRANGE. Each entry holds the pub/sub message (``m``)
and the time it expires (``x``, ms); expired entries are removed from the
front on every publish and read.

Behind Redis Sentinel a failover promotes a replica that may not have seen
the last publications; giving out their offsets again would hand a client
different data under a position it already holds. So there (``WRITER_CHECK``,
see ``with_writer_check``) a stream's metadata records which server wrote it
last (``w``: the server's ``run_id`` and replication id, read from INFO in
the script, on the server that runs it), and a stream last written by any
other server, or by this one in an earlier role, counts as gone: it starts
again at offset 0 under a new epoch, exactly as an expired stream does.
A promoted replica gets a new replication id and a restarted server a new
run id, so whatever may have lost acknowledged publications gets a new epoch.
One promotion changes neither: a master the sentinels failed over from but
never reached to demote (a split brain) and then promote again keeps both,
and its streams miss what the other master acknowledged meanwhile. So the
metadata also records the Sentinel configuration epoch of the call that
started the stream (``g``; every call passes the newest its node has seen,
as its last argument), and a stream started under an older configuration
than the caller's is stale too.
A durable channel's stream is never started afresh: its scripts are called
with an empty ``new_epoch`` and report a missing or stale stream instead
(offset -1), and the broker seeds it from the durable log, which holds every
acknowledged publication, so its epoch and offsets go on.
"""

# Shared helpers, prepended to each script.
_COMMON = """
local WRITER_CHECK = false
local writer_id = nil

-- This server's identity in its current role: run id (a new one on every
-- start) and replication id (a new one on every promotion).
local function writer()
  if writer_id == nil then
    -- (One section per call: INFO takes several only since Redis 7.)
    local run = string.match(redis.call('INFO', 'server'), 'run_id:(%w+)') or '?'
    local replid = string.match(redis.call('INFO', 'replication'), 'master_replid:(%w+)') or '?'
    writer_id = run .. ':' .. replid
  end
  return writer_id
end

-- The Sentinel configuration epoch the caller knows: the last argument of
-- every script call when WRITER_CHECK is on.
local function config_epoch()
  return tonumber(ARGV[#ARGV]) or 0
end

-- The stream was last written by another server (or by this one in an
-- earlier role), or under an older Sentinel configuration than the
-- caller's: it may lack acknowledged publications. (A caller that knows an
-- older configuration than the stream's is behind, not the stream.)
local function stale(meta)
  if not WRITER_CHECK then return false end
  local seen = redis.call('HMGET', meta, 'w', 'g')
  if seen[1] ~= writer() then return true end
  return (tonumber(seen[2]) or 0) < config_epoch()
end

local function set_meta(meta, epoch, offset)
  if WRITER_CHECK then
    redis.call('HSET', meta, 'e', epoch, 'o', offset, 'w', writer(), 'g', config_epoch())
  else
    redis.call('HSET', meta, 'e', epoch, 'o', offset)
  end
end

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function trim(hist, now)
  for _ = 1, 1000 do
    local first = redis.call('XRANGE', hist, '-', '+', 'COUNT', 1)
    if #first == 0 then return end
    local fields = first[1][2]
    local expires = nil
    for i = 1, #fields, 2 do
      if fields[i] == 'x' then expires = tonumber(fields[i + 1]) end
    end
    if expires == nil or expires > now then return end
    redis.call('XDEL', hist, first[1][1])
  end
end

-- The stream's epoch and offset, creating the stream when it has none.
-- With new_epoch '' (a durable channel, whose position is the log's) a
-- missing or stale stream is not created: -1, '' say so, and the caller
-- seeds it from the log.
local function position(meta, hist, new_epoch, meta_ttl)
  local epoch = redis.call('HGET', meta, 'e')
  if not epoch or stale(meta) then
    if new_epoch == '' then return -1, '' end
    redis.call('DEL', meta)
    set_meta(meta, new_epoch, 0)
    redis.call('EXPIRE', meta, meta_ttl)
    redis.call('DEL', hist)
    return 0, new_epoch
  end
  return tonumber(redis.call('HGET', meta, 'o')), epoch
end
"""

# KEYS: meta, hist
# ARGV: tail, size, ttl_ms, meta_ttl_s, new_epoch, pubsub_channel, at_offset,
#       at_epoch, time_ms, sharded ('1' for SPUBLISH)
# Returns {1, offset, epoch} or, when ``at`` does not match, {0, offset, epoch}.
PUBLISH = (
    _COMMON
    + """
local meta, hist = KEYS[1], KEYS[2]
local at_offset = tonumber(ARGV[7])
local offset, epoch
if at_offset > 0 and (redis.call('EXISTS', meta) == 0 or stale(meta)) then
  redis.call('DEL', meta)
  set_meta(meta, ARGV[8], at_offset - 1)
  redis.call('DEL', hist)
end
offset, epoch = position(meta, hist, ARGV[5], ARGV[4])
if at_offset > 0 and (epoch ~= ARGV[8] or offset + 1 ~= at_offset) then
  return {0, offset, epoch}
end
-- The offset is written after the history entry: a script that fails
-- half-way keeps what it wrote, and a position past its history would be
-- a gap nobody could fill.
offset = offset + 1
local msg = 'p' .. offset .. ' ' .. epoch .. ' ' .. ARGV[9] .. ' ' .. ARGV[1]
local size = tonumber(ARGV[2])
if size > 0 then
  local now = now_ms()
  trim(hist, now)
  redis.call('XADD', hist, 'MAXLEN', size, offset .. '-1', 'm', msg, 'x', now + tonumber(ARGV[3]))
  redis.call('PEXPIRE', hist, ARGV[3])
end
redis.call('HSET', meta, 'o', offset)
redis.call('EXPIRE', meta, ARGV[4])
if ARGV[10] == '1' then
  redis.call('SPUBLISH', ARGV[6], msg)
else
  redis.call('PUBLISH', ARGV[6], msg)
end
return {1, offset, epoch}
"""
)

# KEYS: meta, hist
# ARGV: new_epoch, meta_ttl_s, start ('-' or an offset), count, reverse ('1')
# Returns {offset, epoch, {messages...}}
HISTORY = (
    _COMMON
    + """
local meta, hist = KEYS[1], KEYS[2]
local offset, epoch = position(meta, hist, ARGV[1], ARGV[2])
local count = tonumber(ARGV[4])
local out = {}
if count > 0 and offset >= 0 then
  trim(hist, now_ms())
  local entries
  if ARGV[5] == '1' then
    local stop = ARGV[3]
    if stop ~= '-' then stop = stop .. '-1' end
    entries = redis.call('XREVRANGE', hist, '+', stop, 'COUNT', count)
  else
    local start = ARGV[3]
    if start ~= '-' then start = start .. '-1' end
    entries = redis.call('XRANGE', hist, start, '+', 'COUNT', count)
  end
  for i = 1, #entries do
    local fields = entries[i][2]
    for j = 1, #fields, 2 do
      if fields[j] == 'm' then out[#out + 1] = fields[j + 1] end
    end
  end
end
return {offset, epoch, out}
"""
)

# KEYS: meta, hist; ARGV: new_epoch, meta_ttl_s
POSITION = (
    _COMMON
    + """
local offset, epoch = position(KEYS[1], KEYS[2], ARGV[1], ARGV[2])
return {offset, epoch}
"""
)

# KEYS: meta, hist; ARGV: epoch, offset, meta_ttl_s
# Seeds a durable channel's stream at its log's position. A durable stream's
# history holds nothing its log does not (a publication reaches the stream
# after the log took it), so a stale stream of the log's epoch (one a
# promoted replica inherited) keeps its history up to that position:
# clients that recover after a failover are answered from Redis, not all
# from the log at once.
SEED = (
    _COMMON
    + """
if redis.call('EXISTS', KEYS[1]) == 0 or stale(KEYS[1]) then
  local same = redis.call('HGET', KEYS[1], 'e') == ARGV[1]
  redis.call('DEL', KEYS[1])
  set_meta(KEYS[1], ARGV[1], ARGV[2])
  redis.call('EXPIRE', KEYS[1], ARGV[3])
  if same then
    -- Rebuilt, not trimmed with XDEL: a stream's last id stays where its
    -- newest entry was, and the next publication's XADD at the seeded
    -- offset would fail for good ("equal or smaller than the top item").
    local ttl = redis.call('PTTL', KEYS[2])
    local kept = redis.call('XRANGE', KEYS[2], '-', ARGV[2] .. '-1')
    redis.call('DEL', KEYS[2])
    for i = 1, #kept do
      redis.call('XADD', KEYS[2], kept[i][1], unpack(kept[i][2]))
    end
    if #kept > 0 and ttl > 0 then redis.call('PEXPIRE', KEYS[2], ttl) end
  else
    redis.call('DEL', KEYS[2])
  end
end
return 1
"""
)

# KEYS: presence hash, expiry zset; ARGV: client, info, ttl_ms
PRESENCE_ADD = (
    _COMMON
    + """
local expires = now_ms() + tonumber(ARGV[3])
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], expires, ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
return 1
"""
)

# KEYS: presence hash, expiry zset. Drops the members whose entries expired
# (their node stopped refreshing them); returns the time.
_PRESENCE_PRUNE = """
local function prune()
  local now = now_ms()
  local gone = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now)
  for i = 1, #gone do
    redis.call('HDEL', KEYS[1], gone[i])
  end
  if #gone > 0 then
    redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  end
  return now
end
"""

# Presence joins and leaves that say, atomically (one of many concurrent
# callers sees each edge): how many members the channel has, and, when
# ARGV holds a user, whether another member of that user is there.
_PRESENCE_EDGES = (
    _PRESENCE_PRUNE
    + """
local function user_elsewhere(client, user)
  if user == '' then
    return 0
  end
  local all = redis.call('HGETALL', KEYS[1])
  for i = 1, #all, 2 do
    if all[i] ~= client and cjson.decode(all[i + 1])['user'] == user then
      return 1
    end
  end
  return 0
end
"""
)

# KEYS: presence hash, expiry zset; ARGV: client, info, ttl_ms, user ('':
# do not look). Returns {members now, another of the user's was there}.
PRESENCE_JOIN = (
    _COMMON
    + _PRESENCE_EDGES
    + """
local now = prune()
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
redis.call('PEXPIRE', KEYS[2], ARGV[3])
return {redis.call('HLEN', KEYS[1]), user_elsewhere(ARGV[1], ARGV[4])}
"""
)

# KEYS: presence hash, expiry zset; ARGV: client, user ('': do not look).
# Returns {members left, another of the user's is still there}.
PRESENCE_LEAVE = (
    _COMMON
    + _PRESENCE_EDGES
    + """
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
prune()
return {redis.call('HLEN', KEYS[1]), user_elsewhere(ARGV[1], ARGV[2])}
"""
)

# KEYS: presence hash, expiry zset. Drops expired members, returns the rest.
PRESENCE_GET = (
    _COMMON
    + _PRESENCE_PRUNE
    + """
prune()
return redis.call('HGETALL', KEYS[1])
"""
)

# KEYS: node zset; ARGV: node id, info, ttl_ms
NODE_REPORT = (
    _COMMON
    + """
local now = now_ms()
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3] * 2)
redis.call('PEXPIRE', KEYS[2], ARGV[3] * 2)
return 1
"""
)

# KEYS: node zset, node hash. Drops nodes that stopped reporting, returns the rest.
NODE_LIST = (
    _COMMON
    + """
local now = now_ms()
local gone = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)
for i = 1, #gone do
  redis.call('HDEL', KEYS[2], gone[i])
end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
return redis.call('HGETALL', KEYS[2])
"""
)


def with_writer_check(source: str) -> str:
    """``source`` with the last-writer rule on (for servers behind Sentinel)."""
    return source.replace("local WRITER_CHECK = false", "local WRITER_CHECK = true", 1)
