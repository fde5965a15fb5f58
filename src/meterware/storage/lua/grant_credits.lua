#!lua
-- Add micro-credits to a customer's balance. KEYS: customer; ARGV: micros.
-- Reply: {balance, reserved}, or nil if the customer does not exist.

local refused = expect(KEYS[1], 'hash')
if refused then
  return redis.error_reply(refused)
end
if redis.call('EXISTS', KEYS[1]) == 0 then
  return false
end
refused = bad_counter(KEYS[1], 'balance', redis.call('HGET', KEYS[1], 'balance'), math.abs(tonumber(ARGV[1])))
if refused then
  return redis.error_reply(refused)
end
local balance = redis.call('HINCRBY', KEYS[1], 'balance', ARGV[1])
return {balance, tonumber(redis.call('HGET', KEYS[1], 'reserved')) or 0}
