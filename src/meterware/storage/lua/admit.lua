#!lua
-- Admit calls, one after the other: for each, key, customer, rate limits, hard quotas and credits are
-- checked, then the call's units and credits are reserved. The calls of one script run are those of
-- concurrent requests on one shard (redis.py coalesces them), so one round trip admits many. Step for step
-- each admission is MemoryStorage._admit (memory.py); its reply is the list _core.decision_from_reply
-- reads, or {-1, error} when a key holds garbage (that call alone is refused, before its first write:
-- common.lua, all or nothing per call). The keys it reads are type-checked by those reads, the two it only
-- writes by TYPE, and only when it will.
--
-- Calls share templates (the same key of the same customer on the same route weighs the same), so a
-- template's keys and arguments go once per run:
-- KEYS: per template: key record, customer, quota, reservations, reservation deadlines, one rate key per
--       rate limit
-- ARGV: template count, then per template: key count, argument count, its arguments (customer id, charges
--       credits (1/0), reservation id (a placeholder), reservation timeout ms, quota expire-at (s),
--       reservation record head ("customer live period_start"), rate limit count, (amount, seconds)...,
--       hold count, (meter, quota, included, price, need, hold, exact)...); then per call: template
--       number, reservation id.

local function admit(KEYS, ARGV)
  local key, refused = read('hash', 'HMGET', KEYS[1], 'status', 'expires_ms', 'customer')
  if refused then
    return {-1, refused}
  end
  local account
  account, refused = read('hash', 'HMGET', KEYS[2], 'status', 'balance', 'reserved')
  if refused then
    return {-1, refused}
  end
  local now = now_ms()
  if not key[1] or not account[1] or key[3] ~= ARGV[1] then
    return {0, 'unknown_key', 0, 0, 0}
  end
  if key[1] ~= 'active' then
    return {0, 'revoked_key', 0, 0, 0}
  end
  local expires_ms = tonumber(key[2]) or 0
  if expires_ms ~= 0 and now >= expires_ms then
    return {0, 'expired_key', 0, 0, 0}
  end
  if account[1] ~= 'active' then
    return {0, 'suspended', 0, 0, 0}
  end

  -- Rate limits (GCRA): decide on all of them before consuming any.
  local pos = 7
  local rate_count = tonumber(ARGV[pos])
  pos = pos + 1
  local rate_reply, new_tats = {}, {}
  local retry_ms = 0
  for i = 1, rate_count do
    local amount, seconds = tonumber(ARGV[pos]), tonumber(ARGV[pos + 1])
    pos = pos + 2
    local period_ms = seconds * 1000
    local interval = period_ms / amount
    local stored
    stored, refused = read('string', 'GET', KEYS[5 + i])
    if refused then
      return {-1, refused}
    end
    -- Text that is not a number (nan included) counts as no TAT, as if the key had expired.
    stored = tonumber(stored)
    local tat = (stored and stored == stored) and math.max(stored, now) or now
    local new_tat = tat + interval
    if new_tat - now > period_ms then
      retry_ms = math.max(retry_ms, new_tat - period_ms - now)
      rate_reply[#rate_reply + 1] = floordiv(period_ms - (tat - now), interval)
      rate_reply[#rate_reply + 1] = math.floor(tat - now)
    else
      rate_reply[#rate_reply + 1] = floordiv(period_ms - (new_tat - now), interval)
      rate_reply[#rate_reply + 1] = math.floor(new_tat - now)
      new_tats[#new_tats + 1] = {KEYS[5 + i], new_tat}
    end
  end

  local hold_count = tonumber(ARGV[pos])
  pos = pos + 1
  local holds, quota_reply = {}, {}
  local over_quota, needs_positive_balance = false, false
  local credits = 0
  for i = 1, hold_count do
    local meter = ARGV[pos]
    local quota, included, price = tonumber(ARGV[pos + 1]), tonumber(ARGV[pos + 2]), tonumber(ARGV[pos + 3])
    local need, hold, exact = tonumber(ARGV[pos + 4]), tonumber(ARGV[pos + 5]), ARGV[pos + 6] == '1'
    pos = pos + 7
    local counts
    counts, refused = read('hash', 'HMGET', KEYS[3], meter .. ':u', meter .. ':h')
    if refused then
      return {-1, refused}
    end
    holds[i] = {meter, hold, counts[2]}
    local used, held = tonumber(counts[1]) or 0, tonumber(counts[2]) or 0
    if quota >= 0 then
      if used + held + need > quota then
        over_quota = true
        quota_reply[#quota_reply + 1] = quota - used - held
      else
        quota_reply[#quota_reply + 1] = quota - used - held - hold
      end
    end
    if price ~= 0 then
      local base = used + held
      credits = credits + (math.max(included, base + hold) - math.max(included, base)) * price
      if not exact and base + hold >= included then
        needs_positive_balance = true
      end
    end
  end
  local available = (tonumber(account[2]) or 0) - (tonumber(account[3]) or 0)
  local charges_credits = ARGV[2] == '1'
  if not charges_credits then
    credits = 0
  end

  local function reply(allowed, reason, retry, reserved, left)
    local out = {allowed, reason, math.floor(retry), reserved, left}
    for _, value in ipairs(rate_reply) do
      out[#out + 1] = value
    end
    for _, value in ipairs(quota_reply) do
      out[#out + 1] = value
    end
    return out
  end

  if retry_ms > 0 then
    return reply(0, 'rate_limited', retry_ms, 0, available)
  end
  if over_quota then
    return reply(0, 'quota_exceeded', 0, 0, available)
  end
  if charges_credits and (available < credits or (needs_positive_balance and available - credits <= 0)) then
    return reply(0, 'insufficient_credits', 0, 0, available)
  end

  -- The writes below cannot fail once these hold (plan meters are distinct, so each field moves once).
  local holds_any = false
  for _, hold in ipairs(holds) do
    if hold[2] ~= 0 then
      refused = refused or bad_counter(KEYS[3], hold[1] .. ':h', hold[3], math.abs(hold[2]))
      holds_any = true
    end
  end
  if credits ~= 0 then
    refused = refused or bad_counter(KEYS[2], 'reserved', account[3], math.abs(credits))
  end
  if credits ~= 0 or holds_any then
    refused = refused or expect(KEYS[4], 'hash') or expect(KEYS[5], 'zset')
  end
  if refused then
    return {-1, refused}
  end

  for _, entry in ipairs(new_tats) do
    -- %.17g keeps the float exactly; the key is worthless once the TAT has passed. A TAT within a float's
    -- rounding of now (a rate finer than the clock can tell) still gets a valid expiry.
    local ttl = math.max(1, math.ceil(entry[2] - now))
    redis.call('SET', entry[1], string.format('%.17g', entry[2]), 'PX', int(ttl))
  end
  local record = ARGV[6] .. ' ' .. int(credits)
  for _, hold in ipairs(holds) do
    if hold[2] ~= 0 then
      redis.call('HINCRBY', KEYS[3], hold[1] .. ':h', int(hold[2]))
    end
    record = record .. ' ' .. hold[1] .. ' ' .. int(hold[2])
  end
  if holds_any then
    redis.call('EXPIREAT', KEYS[3], ARGV[5])
  end
  if credits ~= 0 then
    redis.call('HINCRBY', KEYS[2], 'reserved', int(credits))
  end
  if credits ~= 0 or holds_any then
    redis.call('HSET', KEYS[4], ARGV[3], record)
    redis.call('ZADD', KEYS[5], int(now + tonumber(ARGV[4])), ARGV[3])
  end
  return reply(1, '', 0, credits, available - credits)
end

local templates, key_pos, pos = {}, 1, 2
for t = 1, tonumber(ARGV[1]) do
  local key_count, arg_count = tonumber(ARGV[pos]), tonumber(ARGV[pos + 1])
  local keys, args = {}, {}
  for i = 1, key_count do
    keys[i] = KEYS[key_pos]
    key_pos = key_pos + 1
  end
  for i = 1, arg_count do
    args[i] = ARGV[pos + 1 + i]
  end
  templates[t] = {keys, args}
  pos = pos + 2 + arg_count
end
local replies = {}
for c = pos, #ARGV, 2 do
  local template = templates[tonumber(ARGV[c])]
  template[2][3] = ARGV[c + 1]
  replies[#replies + 1] = admit(template[1], template[2])
end
return replies
