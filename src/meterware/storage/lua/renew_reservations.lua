#!lua
-- Push back the deadlines of reservations whose calls are still running in a live app process, so the
-- worker's refund (meant for the reservations of a process that died) leaves them alone. A reservation
-- settled or refunded meanwhile is left alone, and a deadline is never brought forward.
-- Reply: how many reservations are still open (renewed).
-- KEYS: reservations, reservation deadlines
-- ARGV: (reservation id, timeout ms)...

local stop, reply = preamble({KEYS[1], 'hash', KEYS[2], 'zset'})
if stop then
  return reply
end
local now, renewed = now_ms(), 0
for i = 1, #ARGV, 2 do
  local id, deadline = ARGV[i], now + tonumber(ARGV[i + 1])
  if redis.call('HEXISTS', KEYS[1], id) == 1 then
    local current = redis.call('ZSCORE', KEYS[2], id)
    if not current or tonumber(current) < deadline then
      redis.call('ZADD', KEYS[2], int(deadline), id)
    end
    renewed = renewed + 1
  end
end
return renewed
