#!lua
-- Expire grants of one customer: append an `expiry` entry for what is left of each (computed by
-- meterware.billing.ledger from the ledger up to its last entry) and take it off the balance, only if the ledger
-- has not moved since (so each grant expires once, by what was really left). Same as
-- MemoryStorage.expire_grants (storage/memory/).
-- KEYS: customer, ledger stream, grant expiries zset
-- ARGV: expected last ledger entry id ("0-0": empty), actor, then (grant id, amount, zset member)...
-- Reply: 1 if applied, 0 if the ledger moved (recompute and retry), nil if the customer does not exist.

local stop, reply = preamble({KEYS[1], 'hash', KEYS[2], 'stream', KEYS[3], 'zset'}, KEYS[1], true, false)
if stop then
  return reply
end
local last = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)
if (last[1] and last[1][1] or '0-0') ~= ARGV[1] then
  return 0
end
local total, moved = 0, 0
for i = 3, #ARGV, 3 do
  total = total + tonumber(ARGV[i + 1])
  moved = moved + math.abs(tonumber(ARGV[i + 1]))
end
local refused = bad_counter(KEYS[1], 'balance', redis.call('HGET', KEYS[1], 'balance'), moved)
if refused then
  return redis.error_reply(refused)
end
for i = 3, #ARGV, 3 do
  if ARGV[i + 1] ~= '0' then
    redis.call('XADD', KEYS[2], '*', 'k', 'expiry', 'a', ARGV[i + 1], 'g', ARGV[i], 'by', ARGV[2], 'why', 'expired')
  end
end
for i = 3, #ARGV, 3 do
  redis.call('ZREM', KEYS[3], ARGV[i + 2])
end
if total ~= 0 then
  redis.call('HINCRBY', KEYS[1], 'balance', int(total))
end
return 1
