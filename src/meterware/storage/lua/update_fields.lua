#!lua
-- Set fields of an existing hash (customer, key record). KEYS: the hash; ARGV: field, value pairs.
-- Reply: 0 if the hash does not exist (nothing is created).

local stop, reply = preamble({KEYS[1], 'hash'}, KEYS[1], true, 0)
if stop then
  return reply
end
if #ARGV > 0 then
  redis.call('HSET', KEYS[1], unpack(ARGV))
end
return 1
