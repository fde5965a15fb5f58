#!lua
-- Create a customer unless it exists. KEYS: customer, shard's customer set
-- ARGV: id, plan, status, anchor. Reply: 1 if created, 0 if it already existed.

local refused = expect(KEYS[1], 'hash') or expect(KEYS[2], 'set')
if refused then
  return redis.error_reply(refused)
end
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
redis.call('HSET', KEYS[1], 'plan', ARGV[2], 'status', ARGV[3], 'anchor', ARGV[4], 'balance', '0', 'reserved', '0')
redis.call('SADD', KEYS[2], ARGV[1])
return 1
