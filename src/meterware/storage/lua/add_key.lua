#!lua
-- Record a key in its customer's shard. KEYS: customer, key record, customer's key list
-- ARGV: key id, then the record's field, value pairs. Reply: 0 if the customer does not exist.

local stop, reply = preamble({KEYS[1], 'hash', KEYS[2], 'hash', KEYS[3], 'list'}, KEYS[1], true, 0)
if stop then
  return reply
end
redis.call('HSET', KEYS[2], unpack(ARGV, 2))
redis.call('RPUSH', KEYS[3], ARGV[1])
return 1
