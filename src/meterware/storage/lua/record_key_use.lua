#!lua
-- Raise a key's last use to ARGV[1] (epoch ms) unless it is later already. KEYS: the key record.
-- Reply: 0 if the record does not exist (nothing is created: a deleted key stays deleted).

local stop, reply = preamble({KEYS[1], 'hash'}, KEYS[1], true, 0)
if stop then
  return reply
end
local used = tonumber(ARGV[1])
-- A value that is not a number (never written by meterware) is replaced.
if used > (tonumber(redis.call('HGET', KEYS[1], 'last_used_ms')) or 0) then
  redis.call('HSET', KEYS[1], 'last_used_ms', int(used))
end
return 1
