#!lua
-- Stop a key that counts its uses and take the uses it has left, at once (a rotation hands them to the
-- replacement; two rotations at once must not both take them): they go to 0 and the key expires at
-- ARGV[1] (epoch ms), or now if that is earlier, by the server's clock, which also tells whether it has
-- expired: the later of two rotations finds it expired whatever the clocks of their clients.
-- KEYS: the key record. ARGV: expires at. Reply: the uses taken, or -1 (nothing changed) if the record
-- does not exist, is not active, has expired or counts no uses.

local stop, reply = preamble({KEYS[1], 'hash'}, KEYS[1], true, -1)
if stop then
  return reply
end
local status, expires, remaining = unpack(redis.call('HMGET', KEYS[1], 'status', 'expires_ms', 'remaining'))
local expires_ms, uses = tonumber(expires) or 0, tonumber(remaining)
local now = now_ms()
if status ~= 'active' or not uses or (expires_ms ~= 0 and expires_ms <= now) then
  return -1
end
redis.call('HSET', KEYS[1], 'remaining', '0', 'expires_ms', int(math.min(tonumber(ARGV[1]), now)))
return uses
