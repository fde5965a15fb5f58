#!lua
-- Correct one event (void or amend), once: only if its marker still holds the state the correction was
-- computed from, append the correction to the shard's stream (the rollup subtracts the event, and adds
-- its amended version), move the credits with their ledger entry and the period's spend (SPENT, the spend
-- cap's count, never below 0) by the event's change of cost, and record the new state. Same as
-- MemoryStorage.correct_event (storage/memory/).
-- KEYS: correction marker, events stream, customer, ledger stream, the event's period's quota hash
-- ARGV: expected state ("" if none), new state, payload, costs, signs, entry tag, then the ledger entry
--       (amount, kind, grant, actor, reason, ref, priority, expires_ms; amount "0": no entry), then the
--       change of spend
-- Reply: 1 if applied, 0 if the marker changed meanwhile.

local stop, reply = preamble({
  KEYS[1], 'string', KEYS[2], 'stream', KEYS[3], 'hash', KEYS[4], 'stream', KEYS[5], 'hash'
})
if stop then
  return reply
end
if (redis.call('GET', KEYS[1]) or '') ~= ARGV[1] then
  return 0
end
local amount = tonumber(ARGV[7])
local credits = amount ~= 0 and existed(KEYS[3])
if credits then
  local refused = bad_counter(KEYS[3], 'balance', redis.call('HGET', KEYS[3], 'balance'), math.abs(amount))
  if refused then
    return redis.error_reply(refused)
  end
end
-- A period whose hash has expired (closed long ago) has no spend left to correct.
local spent = tonumber(ARGV[15]) or 0
local spent_now = false
if spent ~= 0 and existed(KEYS[5]) then
  spent_now = redis.call('HGET', KEYS[5], SPENT)
  local refused = bad_counter(KEYS[5], SPENT, spent_now, math.abs(spent))
  if refused then
    return redis.error_reply(refused)
  end
end
redis.call('XADD', KEYS[2], '*', 'b', ARGV[3], 'c', ARGV[4], 'n', ARGV[5], 'i', ARGV[6])
if credits then
  redis.call('XADD', KEYS[4], '*', unpack(ledger_fields(ARGV, 7)))
  redis.call('HINCRBY', KEYS[3], 'balance', ARGV[7])
end
if spent_now ~= false then
  redis.call('HSET', KEYS[5], SPENT, math.max(0, (tonumber(spent_now) or 0) + spent))
end
redis.call('SET', KEYS[1], ARGV[2])
return 1
