#!lua
-- List up to ARGV[1] reservations of a shard past their deadline (Redis's clock), as id, record pairs.
-- KEYS: reservations, reservation deadlines. Deadlines whose reservation is already settled are dropped.

local stop, reply = preamble({KEYS[1], 'hash', KEYS[2], 'zset'})
if stop then
  return reply
end
local out = {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', int(now_ms()), 'LIMIT', 0, ARGV[1])) do
  local record = redis.call('HGET', KEYS[1], id)
  if record then
    out[#out + 1] = id
    out[#out + 1] = record
  else
    redis.call('ZREM', KEYS[2], id)
  end
end
return out
