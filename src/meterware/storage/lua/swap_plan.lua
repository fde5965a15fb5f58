#!lua
-- Set one stored plan's record only if it still holds what the caller read (compare and set); the hash
-- of stored plans is made by the first one stored.
-- KEYS: the hash; ARGV: plan name, expected record ('' for none), new record.
-- Reply: -1 if the record changed meanwhile (nothing written), 1 if set.

local stop, reply = preamble({KEYS[1], 'hash'})
if stop then
  return reply
end
local current = redis.call('HGET', KEYS[1], ARGV[1]) or ''
if current ~= ARGV[2] then
  return -1
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
return 1
