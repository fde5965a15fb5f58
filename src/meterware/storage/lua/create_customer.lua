#!lua
-- Create a customer unless it exists. KEYS: customer, shard's customer set
-- ARGV: id, plan, status, anchor. Reply: 1 if created, 0 if it already existed.

local stop, reply = preamble({KEYS[1], 'hash', KEYS[2], 'set'}, KEYS[1], false, 0)
if stop then
  return reply
end
redis.call('HSET', KEYS[1], 'plan', ARGV[2], 'status', ARGV[3], 'anchor', ARGV[4], 'balance', '0', 'reserved', '0')
redis.call('SADD', KEYS[2], ARGV[1])
return 1
