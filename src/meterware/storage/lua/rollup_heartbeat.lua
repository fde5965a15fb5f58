#!lua
-- A rollup worker says it is alive for ttl ms more, and learns who else is. Expired workers are removed
-- on each call, so the set holds only live ones. Same as MemoryStorage.rollup_heartbeat (storage/memory/).
-- KEYS: workers; ARGV: owner, ttl ms. Reply: the live workers' names (this one included).

local stop, reply = preamble({KEYS[1], 'zset'})
if stop then
  return reply
end
if not string.find(ARGV[2], '^[1-9]%d*$') then
  return redis.error_reply('ERR heartbeat ttl must be a whole number of ms, at least 1')
end
local now = now_ms()
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', int(now))
redis.call('ZADD', KEYS[1], int(now + tonumber(ARGV[2])), ARGV[1])
-- The set goes when its last worker's heartbeat does.
local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
redis.call('PEXPIREAT', KEYS[1], int(tonumber(last[2])))
return redis.call('ZRANGE', KEYS[1], 0, -1)
