#!lua
-- Set fields of an existing hash (customer, key record). KEYS: the hash; ARGV: field, value pairs.
-- Reply: 0 if the hash does not exist (nothing is created).

local refused = expect(KEYS[1], 'hash')
if refused then
  return redis.error_reply(refused)
end
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
if #ARGV > 0 then
  redis.call('HSET', KEYS[1], unpack(ARGV))
end
return 1
