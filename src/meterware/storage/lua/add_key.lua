#!lua
-- Record a key in its customer's shard. KEYS: customer, key record, customer's key list
-- ARGV: key id, then the record's field, value pairs. Reply: 0 if the customer does not exist.

local refused = expect(KEYS[1], 'hash') or expect(KEYS[2], 'hash') or expect(KEYS[3], 'list')
if refused then
  return redis.error_reply(refused)
end
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
redis.call('HSET', KEYS[2], unpack(ARGV, 2))
redis.call('RPUSH', KEYS[3], ARGV[1])
return 1
