#!lua
-- Admit calls, one after the other: for each, key, customer, rate limits, hard quotas and credits are
-- checked, then the call's units and credits are reserved. The calls of one script run are those of
-- concurrent requests on one shard (the asyncio client coalesces them), so one round trip admits many.
-- Step for step each admission is MemoryStorage._admit (memory/_request.py); its reply is the list
-- storage/_admission.py describes and reads, or {SCRIPT_REFUSED, error} when a key holds garbage (that
-- call alone is refused, before its first write: common.lua, all or nothing per call). The keys it reads are type-checked by those reads, the two it only
-- writes by TYPE, and only when it will.
--
-- A lease asks for many calls at once (`calls`): it gets as many as fit, the largest of calls, calls/2,
-- calls/4... under every limit, halved once more when not all fit (near a limit, what is left is shared
-- out in ever smaller leases); the reply says how many. A single call is a lease of 1.
--
-- Calls share templates (the same key of the same customer on the same route weighs the same), so a
-- template's keys and arguments go once per run:
-- KEYS: per template: key record, customer, quota, reservations, reservation deadlines, one rate key per
--       rate limit
-- ARGV: template count, then per template: key count, argument count, its arguments (customer id, charges
--       credits (1/0), reservation id (a placeholder), reservation timeout ms, quota expire-at (s),
--       reservation record head ("customer live period_start"), calls (1, or a lease's), rate limit
--       count, (amount, seconds)...,
--       hold count, (meter, quota, included, price, need, hold, exact)...); then per call: template
--       number, reservation id, and the changes still to come from the calls this process finished
--       ("" if none; else msgpack: first the guard, the KEYS index of the key holding the highest
--       generation written of the process's batches (0: no guard) and the generation it read; then
--       per change, the KEYS index of the batch marker that says it is written (0: not in a batch
--       yet), the credits it releases, then per hold of the template the units it charges and the
--       units it releases). A change counts while its batch is not written, so the calls of a batch
--       count once, flushed or not (_unsettled.py); a call whose process wrote a batch made after it
--       read its changes (those not in a batch then may be in it) is answered {STALE} and asked again.

-- Positions in a template's KEYS and arguments, and the first value of a reply that decides nothing
-- (storage/_admission.py builds and reads the same layout).
local KEY_RECORD, CUSTOMER, QUOTA, RESERVATIONS, DEADLINES, FIRST_RATE = 1, 2, 3, 4, 5, 6
local CUSTOMER_ID, CHARGES_CREDITS, RESERVATION_ID, RESERVATION_TIMEOUT_MS = 1, 2, 3, 4
local QUOTA_EXPIRE_AT, RECORD_HEAD, CALLS, RATE_LIMITS = 5, 6, 7, 8
local SCRIPT_REFUSED, STALE = -1, -2

-- The calls of a run mostly share their keys (one customer's concurrent calls): each key is read once
-- per run, each call sees what the calls before it admitted (kept here), and the writes wait for the end
-- of the run, one command per key. Every call is still decided exactly as if it ran alone, in order.
local now = now_ms()
local replies_read = {}   -- what a read returned: by its key (and meter), {reply, error}
local fields = {}         -- "key\nfield" -> a counter field the run moves: {key, field, raw, net}
local field_order = {}
local tats = {}           -- rate key -> the TAT the run left (its admissions' are written at the end)
local expire_at = {}      -- quota key -> the EXPIREAT of the run's last admission holding units in it
local reservations = {}   -- {reservations key, deadlines key, HSET arguments, ZADD arguments}, per pair

-- A read of this run, made once (nothing the run writes before its end changes what it returned): `id`
-- names it, `key` or `key .. meter`.
local function read_once(id, kind, command, key, ...)
  local known = replies_read[id]
  if not known then
    local reply, refused = read(kind, command, key, ...)
    known = {reply, refused}
    replies_read[id] = known
  end
  return known[1], known[2]
end

-- A counter field the run may move, as its first read found it (`raw`: its text, or false if absent).
local function field_of(key, field, raw)
  local id = key .. '\n' .. field
  local entry = fields[id]
  if not entry then
    entry = {key = key, field = field, raw = raw, net = 0}
    fields[id] = entry
    field_order[#field_order + 1] = entry
  end
  return entry
end

-- The field's text as HINCRBY would have left it after the run's admissions so far.
local function current(entry)
  if entry.net == 0 then
    return entry.raw
  end
  return int((tonumber(entry.raw) or 0) + entry.net)
end

-- The reply refusing a call before any limit is read (the key or the customer).
local function refusal(reason)
  return {0, reason, 0, 0, 0}
end

-- What admitting n calls would do: the refusal reason (or nil), and the state the reply reports.
local function decide(limits, terms, n, charges_credits, available)
  local d = {rates = {}, new_tats = {}, quotas = {}, holds = {}, retry_ms = 0, credits = 0}
  for _, limit in ipairs(limits) do
    local period_ms, interval, tat = limit.period_ms, limit.interval, limit.tat
    local new_tat = tat + interval * n
    if new_tat - now > period_ms then
      d.retry_ms = math.max(d.retry_ms, new_tat - period_ms - now)
      d.rates[#d.rates + 1] = floordiv(period_ms - (tat - now), interval)
      d.rates[#d.rates + 1] = math.floor(tat - now)
    else
      d.rates[#d.rates + 1] = floordiv(period_ms - (new_tat - now), interval)
      d.rates[#d.rates + 1] = math.floor(new_tat - now)
      d.new_tats[#d.new_tats + 1] = {limit.key, new_tat}
    end
  end
  local over_quota, needs_positive_balance = false, false
  for i, term in ipairs(terms) do
    -- A value meter's size is unknown until the end: one unit left admits it, however many calls.
    local need, hold = term.exact and term.need * n or term.need, term.hold * n
    local used, held = term.used, term.held
    d.holds[i] = hold
    if term.quota >= 0 then
      if used + held + need > term.quota then
        over_quota = true
        d.quotas[#d.quotas + 1] = term.quota - used - held
      else
        d.quotas[#d.quotas + 1] = term.quota - used - held - hold
      end
    end
    if term.price ~= 0 then
      local base = used + held
      d.credits = d.credits + (math.max(term.included, base + hold) - math.max(term.included, base)) * term.price
      if not term.exact and base + hold >= term.included then
        needs_positive_balance = true
      end
    end
  end
  if not charges_credits then
    d.credits = 0
  end
  if d.retry_ms > 0 then
    d.reason = 'rate_limited'
  elseif over_quota then
    d.reason = 'quota_exceeded'
  elseif charges_credits and (available < d.credits or (needs_positive_balance and available - d.credits <= 0)) then
    d.reason = 'insufficient_credits'
  end
  return d
end

local function reply(d, allowed, reason, retry, reserved, left, granted)
  local out = {allowed, reason, math.floor(retry), reserved, left, granted}
  for _, value in ipairs(d.rates) do
    out[#out + 1] = value
  end
  for _, value in ipairs(d.quotas) do
    out[#out + 1] = value
  end
  return out
end

local function admit(KEYS, ARGV, unsettled)
  local key, refused = read_once(KEYS[KEY_RECORD], 'hash', 'HMGET', KEYS[KEY_RECORD], 'status', 'expires_ms', 'customer')
  if refused then
    return {SCRIPT_REFUSED, refused}
  end
  local account
  account, refused = read_once(KEYS[CUSTOMER], 'hash', 'HMGET', KEYS[CUSTOMER], 'status', 'balance', 'reserved')
  if refused then
    return {SCRIPT_REFUSED, refused}
  end
  if not key[1] or not account[1] or key[3] ~= ARGV[CUSTOMER_ID] then
    return refusal('unknown_key')
  end
  if key[1] ~= 'active' then
    return refusal('revoked_key')
  end
  local expires_ms = tonumber(key[2]) or 0
  if expires_ms ~= 0 and now >= expires_ms then
    return refusal('expired_key')
  end
  if account[1] ~= 'active' then
    return refusal('suspended')
  end
  -- A counter that is not an integer (clobbered) would be read as whatever tonumber makes of it ('1e308'
  -- credits, '-1e300' calls used): refused, as a key of the wrong type is (the request path then refuses
  -- the call whatever its failure policy: serving it would serve the customer free until repaired).
  local reserved_field = field_of(KEYS[CUSTOMER], 'reserved', account[3])
  refused = bad_counter(KEYS[CUSTOMER], 'balance', account[2], 0)
    or bad_counter(KEYS[CUSTOMER], 'reserved', current(reserved_field), 0)
  if refused then
    return {SCRIPT_REFUSED, refused}
  end

  -- Read everything the decision needs (rate TATs, quota counters) before deciding anything.
  local calls = tonumber(ARGV[CALLS])
  local pos = RATE_LIMITS
  local limits = {}
  for i = 1, tonumber(ARGV[pos]) do
    local amount, seconds = tonumber(ARGV[pos + 1]), tonumber(ARGV[pos + 2])
    pos = pos + 2
    local rate_key = KEYS[FIRST_RATE - 1 + i]
    local stored
    stored, refused = read_once(rate_key, 'string', 'GET', rate_key)
    if refused then
      return {SCRIPT_REFUSED, refused}
    end
    -- Text that is not a number (nan included) counts as no TAT, as if the key had expired.
    stored = tats[rate_key] or tonumber(stored)
    local tat = (stored and stored == stored) and math.max(stored, now) or now
    if tat > now + seconds * 1000 then
      -- Never written so (a TAT is at most one period ahead): clamped, and repaired at the end of the run
      -- (what any admission would write), so the limit recovers within one period.
      tat = now + seconds * 1000
      tats[rate_key] = tat
    end
    limits[i] = {key = rate_key, period_ms = seconds * 1000, interval = seconds * 1000 / amount, tat = tat}
  end
  pos = pos + 1
  local terms = {}
  for i = 1, tonumber(ARGV[pos]) do
    local meter = ARGV[pos + 1]
    local counts
    counts, refused = read_once(KEYS[QUOTA] .. '\n' .. meter, 'hash', 'HMGET', KEYS[QUOTA], meter .. ':u', meter .. ':h')
    local held_field = counts and field_of(KEYS[QUOTA], meter .. ':h', counts[2])
    refused = refused or bad_counter(KEYS[QUOTA], meter .. ':u', counts[1], 0)
      or bad_counter(KEYS[QUOTA], meter .. ':h', current(held_field), 0)
    if refused then
      return {SCRIPT_REFUSED, refused}
    end
    terms[i] = {
      meter = meter, quota = tonumber(ARGV[pos + 2]), included = tonumber(ARGV[pos + 3]),
      price = tonumber(ARGV[pos + 4]), need = tonumber(ARGV[pos + 5]), hold = tonumber(ARGV[pos + 6]),
      exact = ARGV[pos + 7] == '1', used = tonumber(counts[1]) or 0,
      held = tonumber(current(held_field)) or 0, held_field = held_field,
    }
    pos = pos + 7
  end
  local charges_credits = ARGV[CHARGES_CREDITS] == '1'
  local reserved = tonumber(current(reserved_field)) or 0
  local pending_cost = 0
  if unsettled then
    local released, charged, freed = 0, {}, {}
    for i = 1, #terms do
      charged[i], freed[i] = 0, 0
    end
    for _, change in ipairs(unsettled) do
      if not change[1] or redis.call('EXISTS', change[1]) == 0 then
        released = released + change[2]
        for i = 1, #terms do
          charged[i] = charged[i] + change[1 + 2 * i]
          freed[i] = freed[i] + change[2 + 2 * i]
        end
      end
    end
    for i, term in ipairs(terms) do
      local used = term.used
      term.used = used + charged[i]
      term.held = math.max(0, term.held - freed[i])
      pending_cost = pending_cost + (math.max(term.included, term.used) - math.max(term.included, used)) * term.price
    end
    reserved = math.max(0, reserved - released)
  end
  local available = (tonumber(account[2]) or 0) - reserved - (charges_credits and pending_cost or 0)

  local n = calls
  local d = decide(limits, terms, n, charges_credits, available)
  if d.reason and n > 1 then
    repeat
      n = math.floor(n / 2)
      d = decide(limits, terms, n, charges_credits, available)
    until not d.reason or n == 1
    if not d.reason and n > 1 then
      n = math.floor(n / 2)
      d = decide(limits, terms, n, charges_credits, available)
    end
  end

  if d.reason then
    return reply(d, 0, d.reason, d.reason == 'rate_limited' and d.retry_ms or 0, 0, available, 0)
  end

  -- The writes cannot fail once these hold (plan meters are distinct, so each field moves once per call).
  local credits = d.credits
  local holds_any = false
  for i, term in ipairs(terms) do
    if d.holds[i] ~= 0 then
      refused = refused or bad_counter(KEYS[QUOTA], term.meter .. ':h', current(term.held_field), math.abs(d.holds[i]))
      holds_any = true
    end
  end
  if credits ~= 0 then
    refused = refused or bad_counter(KEYS[CUSTOMER], 'reserved', current(reserved_field), math.abs(credits))
  end
  if credits ~= 0 or holds_any then
    refused = refused or expect(KEYS[RESERVATIONS], 'hash') or expect(KEYS[DEADLINES], 'zset')
  end
  if refused then
    return {SCRIPT_REFUSED, refused}
  end

  -- Admitted: what it writes joins the run's writes.
  for _, entry in ipairs(d.new_tats) do
    tats[entry[1]] = entry[2]
  end
  local record = ARGV[RECORD_HEAD] .. ' ' .. int(credits)
  for i, term in ipairs(terms) do
    term.held_field.net = term.held_field.net + d.holds[i]
    record = record .. ' ' .. term.meter .. ' ' .. int(d.holds[i])
  end
  if holds_any then
    expire_at[KEYS[QUOTA]] = ARGV[QUOTA_EXPIRE_AT]
  end
  reserved_field.net = reserved_field.net + credits
  if credits ~= 0 or holds_any then
    local id = KEYS[RESERVATIONS] .. '\n' .. KEYS[DEADLINES]
    local pending = reservations[id]
    if not pending then
      pending = {KEYS[RESERVATIONS], KEYS[DEADLINES], {}, {}}
      reservations[id] = pending
    end
    local records, deadlines = pending[3], pending[4]
    records[#records + 1] = ARGV[RESERVATION_ID]
    records[#records + 1] = record
    deadlines[#deadlines + 1] = int(now + tonumber(ARGV[RESERVATION_TIMEOUT_MS]))
    deadlines[#deadlines + 1] = ARGV[RESERVATION_ID]
  end
  return reply(d, 1, '', 0, credits, available - credits, n)
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
for c = pos, #ARGV, 3 do
  local template = templates[tonumber(ARGV[c])]
  template[2][RESERVATION_ID] = ARGV[c + 1]
  local unsettled, stale = nil, false
  if ARGV[c + 2] ~= '' then
    unsettled = cmsgpack.unpack(ARGV[c + 2])
    local guard = table.remove(unsettled, 1)
    if guard[1] ~= 0 then
      local written = redis.pcall('GET', KEYS[guard[1]])
      stale = type(written) == 'string' and (tonumber(written) or 0) > guard[2]
    end
    for _, change in ipairs(unsettled) do
      change[1] = change[1] ~= 0 and KEYS[change[1]]
    end
  end
  if stale then
    replies[#replies + 1] = {STALE, 'STALE'}
  else
    replies[#replies + 1] = admit(template[1], template[2], unsettled)
  end
end

-- The run's writes: the counters first (an EXPIREAT must find the key they create).
for _, entry in ipairs(field_order) do
  if entry.net ~= 0 then
    redis.call('HINCRBY', entry.key, entry.field, int(entry.net))
  end
end
for quota_key, at in pairs(expire_at) do
  redis.call('EXPIREAT', quota_key, at)
end
for rate_key, tat in pairs(tats) do
  -- %.17g keeps the float exactly; the key is worthless once the TAT has passed. A TAT within a float's
  -- rounding of now (a rate finer than the clock can tell) still gets a valid expiry.
  redis.call('SET', rate_key, string.format('%.17g', tat), 'PX', int(math.max(1, math.ceil(tat - now))))
end
for _, pending in pairs(reservations) do
  -- In slices: Lua's unpack takes a few thousand values at most.
  for _, write in ipairs({{'HSET', pending[1], pending[3]}, {'ZADD', pending[2], pending[4]}}) do
    local command, key, args = write[1], write[2], write[3]
    for first = 1, #args, 1000 do
      redis.call(command, key, unpack(args, first, math.min(first + 999, #args)))
    end
  end
end
return replies
