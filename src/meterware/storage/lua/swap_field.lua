#!lua
-- Set one field of an existing hash only if it still holds what the caller read (compare and set).
-- KEYS: the hash; ARGV: field, expected value ('' for none), new value.
-- Reply: 0 if the hash does not exist, -1 if the field changed meanwhile (nothing written), 1 if set.

local stop, reply = preamble({KEYS[1], 'hash'}, KEYS[1], true, 0)
if stop then
  return reply
end
local current = redis.call('HGET', KEYS[1], ARGV[1]) or ''
if current ~= ARGV[2] then
  return -1
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
return 1
