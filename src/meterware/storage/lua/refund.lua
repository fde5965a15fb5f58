-- Refund reservations that were never settled (the app died mid-call). Each one is released only if it
-- still exists, so a reservation settled since it was listed is left alone. Reply: how many were refunded.
-- KEYS: reservations, reservation deadlines, then customer and quota keys
-- ARGV: (reservation id, customer key index, quota key index)...

local refunded = 0
for i = 1, #ARGV, 3 do
  local id = ARGV[i]
  local record = redis.call('HGET', KEYS[1], id)
  redis.call('ZREM', KEYS[2], id)
  if record and redis.call('HDEL', KEYS[1], id) == 1 then
    release(record, KEYS[tonumber(ARGV[i + 1])], KEYS[tonumber(ARGV[i + 2])])
    refunded = refunded + 1
  end
end
return refunded
