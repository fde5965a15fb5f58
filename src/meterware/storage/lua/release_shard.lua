#!lua
-- Give up a claim on a shard, only if ARGV[1] still holds it. KEYS: claim.

local stop, reply = preamble({KEYS[1], 'string'})
if stop then
  return reply
end
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
end
return 0
