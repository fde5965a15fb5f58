-- Add micro-credits to a customer's balance. KEYS: customer; ARGV: micros.
-- Reply: {balance, reserved}, or nil if the customer does not exist.

if redis.call('EXISTS', KEYS[1]) == 0 then
  return false
end
local balance = redis.call('HINCRBY', KEYS[1], 'balance', ARGV[1])
return {balance, tonumber(redis.call('HGET', KEYS[1], 'reserved')) or 0}
