-- Flush one batch: settle each event's reservation (charge billable calls, refund the rest) and append the
-- batch to the shard's stream, at once and only once per batch id. Same as MemoryStorage.flush (memory.py).
--
-- KEYS: batch marker, events stream, reservations, reservation deadlines, then customer and quota keys
-- ARGV: batch id, payload, marker ttl (s), settlement count, then per settlement either "0" (none) or
--       "1", reservation id, billable (1/0), charges credits (1/0), customer key index, quota key index,
--       quota expire-at (s), meter count, (meter, units, price, included)...

if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[3]) then
  return 0
end

local costs = {}
local arg = reader(ARGV, 4)
for _ = 1, tonumber(arg()) do
  local cost = 0
  if arg() == '1' then
    local reservation_id, billable, charges_credits = arg(), arg() == '1', arg() == '1'
    local customer_key, quota_key = KEYS[tonumber(arg())], KEYS[tonumber(arg())]
    local expire_at = arg()
    -- The settlement names the reservation's own customer, mode and period (both come from the admission).
    local record = redis.call('HGET', KEYS[3], reservation_id)
    if record then
      redis.call('HDEL', KEYS[3], reservation_id)
      redis.call('ZREM', KEYS[4], reservation_id)
      release(record, customer_key, quota_key)
    end
    for _ = 1, tonumber(arg()) do
      local meter, units, price, included = arg(), tonumber(arg()), tonumber(arg()), tonumber(arg())
      if billable and units ~= 0 then
        local before = tonumber(redis.call('HGET', quota_key, meter .. ':u')) or 0
        redis.call('HINCRBY', quota_key, meter .. ':u', int(units))
        cost = cost + (math.max(included, before + units) - math.max(included, before)) * price
      end
    end
    -- Usage recorded without an admission (served fail-open) still needs the quota hash to expire.
    if billable and redis.call('TTL', quota_key) == -1 then
      redis.call('EXPIREAT', quota_key, expire_at)
    end
    if billable and charges_credits and cost ~= 0 and redis.call('EXISTS', customer_key) == 1 then
      redis.call('HINCRBY', customer_key, 'balance', int(-cost))
    end
  end
  costs[#costs + 1] = int(cost)
end

redis.call('XADD', KEYS[2], '*', 'b', ARGV[2], 'c', table.concat(costs, ','), 'i', ARGV[1])
return 1
