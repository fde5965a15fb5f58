#!lua
-- Move a customer's balance by one ledger entry (grant, purchase, adjustment, refund): append the entry
-- and add its amount, at once, so the balance always equals the sum of the ledger. A grant that expires
-- is also listed in the shard's zset of expiries. Same as MemoryStorage.move_credits (storage/memory/).
-- KEYS: customer, ledger stream, grant expiries zset
-- ARGV: amount (signed micros), kind, grant id, actor, reason, ref, priority, expires_ms, zset member
-- Reply: {balance, reserved}, or nil if the customer does not exist.

local stop, reply = preamble({KEYS[1], 'hash', KEYS[2], 'stream', KEYS[3], 'zset'}, KEYS[1], true, false)
if stop then
  return reply
end
local refused = bad_counter(KEYS[1], 'balance', redis.call('HGET', KEYS[1], 'balance'), math.abs(tonumber(ARGV[1])))
if refused then
  return redis.error_reply(refused)
end
-- The append comes first: it is the one write no check covers (a stream out of ids).
redis.call('XADD', KEYS[2], '*', unpack(ledger_fields(ARGV, 1)))
if ARGV[8] ~= '0' then
  redis.call('ZADD', KEYS[3], ARGV[8], ARGV[9])
end
local balance = redis.call('HINCRBY', KEYS[1], 'balance', ARGV[1])
return {balance, tonumber(redis.call('HGET', KEYS[1], 'reserved')) or 0}
