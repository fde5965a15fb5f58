#!lua
-- Flush one batch: append it to the shard's stream and settle each event's reservation (charge billable
-- calls, refund the rest), at once and only once per batch id. Same as MemoryStorage.flush (memory.py).
-- All or nothing (common.lua): the settlements are planned and checked first; then the append (the one
-- write no check covers: a stream out of ids) comes before the batch marker and the settlement writes.
-- Each customer charged gets one `charge` entry in its credits ledger for the batch (amount: minus the
-- batch's charges, ref: the batch id), appended with the batch, so its balance stays the ledger's sum.
--
-- KEYS: batch marker, events stream, reservations, reservation deadlines, then customer and quota keys
-- ARGV: batch id, payload, marker ttl (s), settlements: one msgpack array (one argument, not thousands:
--       Redis and the client pay per argument) of the settlement count, then per settlement either 0
--       (none) or 1, reservation id, billable (1/0), charges credits (1/0), customer key index, ledger
--       key index, quota key index, quota expire-at (s), meter count, (meter, units, price, included)...

local refused = expect(KEYS[1], 'string')
if refused then
  return redis.error_reply(refused)
end
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
refused = expect(KEYS[2], 'stream') or expect(KEYS[3], 'hash') or expect(KEYS[4], 'zset')
if refused then
  return redis.error_reply(refused)
end

local costs, settled, expiries, expiry_order = {}, {}, {}, {}
local charged, charged_order = {}, {}  -- ledger key -> micros charged, in order of first charge
local arg = reader(cmsgpack.unpack(ARGV[4]), 1)
for _ = 1, tonumber(arg()) do
  local cost = 0
  if arg() == 1 then
    local reservation_id, billable, charges_credits = arg(), arg() == 1, arg() == 1
    local customer_key, ledger_key, quota_key = KEYS[tonumber(arg())], KEYS[tonumber(arg())], KEYS[tonumber(arg())]
    local expire_at = arg()
    refused = expect(customer_key, 'hash') or expect(quota_key, 'hash') or expect(ledger_key, 'stream')
    if refused then
      return redis.error_reply(refused)
    end
    -- The settlement names the reservation's own customer, mode and period (both come from the admission).
    -- A call served without a reservation of its own (a lease's, or fail-open) has none to look up.
    local record = reservation_id ~= '' and not settled[reservation_id]
      and redis.call('HGET', KEYS[3], reservation_id)
    if record then
      settled[reservation_id] = true
      plan('HDEL', KEYS[3], reservation_id)
      plan('ZREM', KEYS[4], reservation_id)
      refused = release(record, customer_key, quota_key, KEYS[3] .. ' field ' .. reservation_id)
      if refused then
        return redis.error_reply(refused)
      end
    end
    for _ = 1, tonumber(arg()) do
      local meter, units, price, included = arg(), tonumber(arg()), tonumber(arg()), tonumber(arg())
      if billable and units ~= 0 then
        local before = planned_value(quota_key, meter .. ':u')
        plan_incr(quota_key, meter .. ':u', units)
        cost = cost + (math.max(included, before + units) - math.max(included, before)) * price
      end
    end
    -- Usage recorded without an admission (served fail-open) still needs the quota hash to expire.
    if billable and not expiries[quota_key] then
      expiries[quota_key] = int(expire_at)
      expiry_order[#expiry_order + 1] = quota_key
    end
    if billable and charges_credits and cost ~= 0 and existed(customer_key) then
      plan_incr(customer_key, 'balance', -cost)
      if not charged[ledger_key] then
        charged[ledger_key] = 0
        charged_order[#charged_order + 1] = ledger_key
      end
      charged[ledger_key] = charged[ledger_key] + cost
    end
  end
  costs[#costs + 1] = int(cost)
end
-- A quota hash that exists after the batch without an expiry gets one (HINCRBY never removes one).
for _, quota_key in ipairs(expiry_order) do
  local ttl = redis.call('TTL', quota_key)
  if ttl == -1 or (ttl == -2 and incremented[quota_key]) then
    plan('EXPIREAT', quota_key, expiries[quota_key])
  end
end

refused = check_counters()
if refused then
  return redis.error_reply(refused)
end
redis.call('XADD', KEYS[2], '*', 'b', ARGV[2], 'c', table.concat(costs, ','), 'i', ARGV[1])
for _, ledger_key in ipairs(charged_order) do
  redis.call('XADD', ledger_key, '*', 'k', 'charge', 'a', int(-charged[ledger_key]), 'r', ARGV[1])
end
redis.call('SET', KEYS[1], '1', 'EX', ARGV[3])
apply()
return 1
