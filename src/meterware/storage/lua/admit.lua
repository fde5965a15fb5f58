#!lua
-- Admit calls, one after the other: for each, key, customer, rate limits, hard quotas and credits are
-- checked, then the call's units and credits are reserved. The calls of one script run are those of
-- concurrent requests on one shard (both clients coalesce them), so one round trip admits many.
-- Step for step each admission is MemoryStorage._admit (memory/_request.py); its reply is the list
-- storage/_admission.py describes and reads, or {SCRIPT_REFUSED, error} when a key holds garbage (that
-- call alone is refused and adds nothing to the run's writes: common.lua, all or nothing per call). The
-- keys it reads are type-checked by those reads, the two it only writes by TYPE, and only when it will.
--
-- Under a spend cap, the period's spend is what its flushes charged (the quota hash's `@spent` field,
-- added to by flush.lua at each call's price), plus what this process's finished calls will charge and
-- what admitted calls hold (their units at this admission's terms); nothing is read for it without one.
--
-- A key record's `remaining` field, present only on a key that counts its uses, gives one use to each call
-- admitted (a lease gets no more calls than uses left); with none left the key is refused, 'key_exhausted'.
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
--       credits (1/0), reservation timeout ms, quota expire-at (s), reservation record head ("customer
--       live period_start"), calls (1, or a lease's), keyed (1: a key's call; 0: a customer the app
--       authenticated itself, whose key record is not read), rate limit count, (amount, seconds)...,
--       hold count, (meter, quota, included, price, need, hold, exact)..., then the spend cap in
--       micro-credits only when the customer has one, then only when the plan limits a meter's units
--       (its spend cap "" if none) each rate limit's cost per call: the meter's estimate (its units
--       per interval; the flush corrects it by the call's actual units), 1 for calls); then per call: template
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
local CUSTOMER_ID, CHARGES_CREDITS, RESERVATION_TIMEOUT_MS = 1, 2, 3
local QUOTA_EXPIRE_AT, RECORD_HEAD, CALLS, KEYED, RATE_LIMITS = 4, 5, 6, 7, 8
local SCRIPT_REFUSED, STALE = -1, -2
-- The hold of a concurrency slot (metering/admission.py's CONCURRENCY_METER): a hard quota of calls in
-- flight, whose refusal is its own.
local CONCURRENCY_METER = '@inflight'

-- The calls of a run mostly share their keys (one customer's concurrent calls): each key is read once
-- per run, each call sees what the calls before it admitted (kept here), and the writes wait for the end
-- of the run, one command per key. Every call is still decided exactly as if it ran alone, in order.
-- A template's arguments are read once per run too (`parse`).
local now = now_ms()
local reads = {}          -- what a read returned: by its key (or quota key and meter)
local read_errors = {}    -- the error of a read that failed, by the same names
local problems = {}       -- a counter's text checked once: by its key (or quota key and meter), false or the error
local counters_moved = {} -- the counter fields admissions move, by customer key or quota key and meter
local moved_order = {}
local tats = {}           -- rate key -> the TAT the run left (written at the end)
local expire_at = {}      -- quota key -> the EXPIREAT of the run's last admission holding units in it
local reservations = {}   -- reservations and deadlines keys -> {the two keys, HSET arguments, ZADD arguments}

-- A read of this run, made once (nothing the run writes before its end changes what it returned).
local function read_once(id, kind, command, key, ...)
  local reply = reads[id]
  if reply == nil then
    local refused
    reply, refused = read(kind, command, key, ...)
    reads[id], read_errors[id] = reply or false, refused
  end
  return reply, read_errors[id]
end

-- bad_counter(key, field, raw, 0) for a counter the run does not move, checked once (by `id`).
local function problem_once(id, key, field, raw)
  local problem = problems[id]
  if problem == nil then
    problem = bad_counter(key, field, raw, 0) or false
    problems[id] = problem
  end
  return problem
end

-- A counter field admissions move (`id` names it): what its first read found, and its value since.
local function counter_of(id, key, field, raw)
  local entry = counters_moved[id]
  if not entry then
    local value = tonumber(raw) or 0
    entry = {key = key, field = field, problem = bad_counter(key, field, raw, 0), value = value, net = 0}
    counters_moved[id] = entry
    moved_order[#moved_order + 1] = entry
  end
  return entry
end

-- bad_counter() of the field's text as HINCRBY would have left it after the run's admissions so far: a
-- text that was not an integer was never moved (every move is checked first), so it still is not one.
local function cannot_move(entry, moved)
  if entry.problem then
    return entry.problem
  end
  if not (math.abs(entry.value) + moved < COUNTER_LIMIT) then
    return 'BADVALUE ' .. entry.key .. ' field ' .. entry.field .. ' would go beyond 2^62'
  end
end

-- A template's arguments, read once per run: its limits, its terms and what its records share.
local function parse(KEYS, ARGV)
  local spec = {
    keys = KEYS, customer_id = ARGV[CUSTOMER_ID], charges_credits = ARGV[CHARGES_CREDITS] == '1',
    calls = tonumber(ARGV[CALLS]), keyed = ARGV[KEYED] == '1', expire_at = ARGV[QUOTA_EXPIRE_AT], head = ARGV[RECORD_HEAD],
    deadline = int(now + tonumber(ARGV[RESERVATION_TIMEOUT_MS])), limits = {}, terms = {}, records = {},
  }
  local pos = RATE_LIMITS
  for i = 1, tonumber(ARGV[pos]) do
    local amount, seconds = tonumber(ARGV[pos + 1]), tonumber(ARGV[pos + 2])
    spec.limits[i] = {
      key = KEYS[FIRST_RATE - 1 + i], period_ms = seconds * 1000, interval = seconds * 1000 / amount, cost = 1,
    }
    pos = pos + 2
  end
  pos = pos + 1
  for i = 1, tonumber(ARGV[pos]) do
    local meter = ARGV[pos + 1]
    spec.terms[i] = {
      meter = meter, id = KEYS[QUOTA] .. '\n' .. meter, used = meter .. ':u', held = meter .. ':h',
      quota = tonumber(ARGV[pos + 2]), included = tonumber(ARGV[pos + 3]), price = tonumber(ARGV[pos + 4]),
      need = tonumber(ARGV[pos + 5]), hold = tonumber(ARGV[pos + 6]), exact = ARGV[pos + 7] == '1',
    }
    pos = pos + 7
  end
  spec.spend_cap = tonumber(ARGV[pos + 1])
  if ARGV[pos + 2] then
    -- A plan limiting a meter: what each rate limit takes of a call (a meter's estimate; calls 1).
    for i, limit in ipairs(spec.limits) do
      limit.cost = tonumber(ARGV[pos + 1 + i])
    end
  end
  local pair = KEYS[RESERVATIONS] .. '\n' .. KEYS[DEADLINES]
  spec.reservations = reservations[pair] or {KEYS[RESERVATIONS], KEYS[DEADLINES], {}, {}}
  reservations[pair] = spec.reservations
  return spec
end

-- The reservation record of `n` calls reserving `credits` ("customer live period_start credits meter hold
-- ..."), made once per run for each.
local function record_of(spec, n, credits)
  local by_credits = spec.records[n]
  if not by_credits then
    by_credits = {}
    spec.records[n] = by_credits
  end
  local record = by_credits[credits]
  if not record then
    local parts = {spec.head, int(credits)}
    for _, term in ipairs(spec.terms) do
      parts[#parts + 1] = term.meter
      parts[#parts + 1] = int(term.hold * n)
    end
    record = table.concat(parts, ' ')
    by_credits[credits] = record
  end
  return record
end

-- The reply refusing a call before any limit is read (the key or the customer).
local function refusal(reason)
  return {0, reason, 0, 0, 0}
end

-- What admitting n calls would do: the refusal reason (or nil), and the state the reply reports.
-- (Admitted, every rate limit moves its TAT by n intervals and every term holds n times its hold.)
-- `charged`: what the period's calls were charged (under a spend cap; else unused).
local function decide(spec, tat_of, used_of, held_of, n, available, charged)
  local states = {}  -- the rate limits' (remaining, reset ms), then the hard quotas' remaining
  local d = {states = states, retry_ms = 0, credits = 0}
  for i, limit in ipairs(spec.limits) do
    local period_ms, interval, tat = limit.period_ms, limit.interval, tat_of[i]
    local new_tat = tat + interval * limit.cost * n
    if new_tat - now > period_ms then
      d.retry_ms = math.max(d.retry_ms, new_tat - period_ms - now)
      states[#states + 1] = floordiv(period_ms - (tat - now), interval)
      states[#states + 1] = math.floor(tat - now)
    else
      states[#states + 1] = floordiv(period_ms - (new_tat - now), interval)
      states[#states + 1] = math.floor(new_tat - now)
    end
  end
  local over_quota, over_concurrency, needs_positive_balance = false, false, false
  local spent = charged  -- what the period's calls cost, charged and held
  for i, term in ipairs(spec.terms) do
    -- A value meter's size is unknown until the end: one unit left admits it, however many calls.
    local need, hold = term.exact and term.need * n or term.need, term.hold * n
    local used, held = used_of[i], held_of[i]
    if term.quota >= 0 then
      if used + held + need > term.quota then
        if term.meter == CONCURRENCY_METER then
          over_concurrency = true
        else
          over_quota = true
        end
        states[#states + 1] = term.quota - used - held
      else
        states[#states + 1] = term.quota - used - held - hold
      end
    end
    if term.price ~= 0 then
      local base = used + held
      if spec.spend_cap then
        -- Held calls at the terms of this admission; what was charged is counted as it was charged.
        spent = spent + (math.max(term.included, base) - math.max(term.included, used)) * term.price
      end
      d.credits = d.credits + (math.max(term.included, base + hold) - math.max(term.included, base)) * term.price
      if not term.exact and base + hold >= term.included then
        needs_positive_balance = true
      end
    end
  end
  local cap, over_cap = spec.spend_cap, false
  if cap then
    -- As credits: a value meter's call past its included units needs room left after its hold.
    over_cap = spent + d.credits > cap or (needs_positive_balance and spent + d.credits >= cap)
    states[#states + 1] = over_cap and cap - spent or cap - spent - d.credits
  end
  local charges_credits = spec.charges_credits
  if not charges_credits then
    d.credits = 0
  end
  if d.retry_ms > 0 then
    d.reason = 'rate_limited'
  elseif over_concurrency then
    d.reason = 'concurrency_exceeded'
  elseif over_quota then
    d.reason = 'quota_exceeded'
  elseif over_cap then
    d.reason = 'spend_cap_reached'
  elseif charges_credits and (available < d.credits or (needs_positive_balance and available - d.credits <= 0)) then
    d.reason = 'insufficient_credits'
  end
  return d
end

local function reply(d, allowed, reason, retry, reserved, left, granted)
  return {allowed, reason, math.floor(retry), reserved, left, granted, unpack(d.states)}
end

local function admit(spec, reservation_id, unsettled)
  local KEYS = spec.keys
  local key, refused = {}, nil
  if spec.keyed then
    key, refused = read_once(
      KEYS[KEY_RECORD], 'hash', 'HMGET', KEYS[KEY_RECORD], 'status', 'expires_ms', 'customer', 'remaining')
    if refused then
      return {SCRIPT_REFUSED, refused}
    end
  end
  local account
  account, refused = read_once(KEYS[CUSTOMER], 'hash', 'HMGET', KEYS[CUSTOMER], 'status', 'balance', 'reserved')
  if refused then
    return {SCRIPT_REFUSED, refused}
  end
  local uses
  if not spec.keyed then
    if not account[1] then
      return refusal('unknown_customer')
    end
  elseif not key[1] or not account[1] or key[3] ~= spec.customer_id then
    return refusal('unknown_key')
  elseif key[1] ~= 'active' then
    return refusal('revoked_key')
  elseif (tonumber(key[2]) or 0) ~= 0 and now >= tonumber(key[2]) then
    return refusal('expired_key')
  elseif key[4] then
    -- A key with remaining uses (the field exists only then) gives one to each call admitted.
    uses = counter_of(KEYS[KEY_RECORD], KEYS[KEY_RECORD], 'remaining', key[4])
    if uses.problem then
      return {SCRIPT_REFUSED, uses.problem}
    end
    if uses.value <= 0 then
      return refusal('key_exhausted')
    end
  end
  if account[1] ~= 'active' then
    return refusal('suspended')
  end
  -- A counter that is not an integer (clobbered) would be read as whatever tonumber makes of it ('1e308'
  -- credits, '-1e300' calls used): refused, as a key of the wrong type is (the request path then refuses
  -- the call whatever its failure policy: serving it would serve the customer free until repaired).
  local reserved_counter = counter_of(KEYS[CUSTOMER], KEYS[CUSTOMER], 'reserved', account[3])
  refused = problem_once(KEYS[CUSTOMER], KEYS[CUSTOMER], 'balance', account[2]) or cannot_move(reserved_counter, 0)
  if refused then
    return {SCRIPT_REFUSED, refused}
  end

  -- Read everything the decision needs (rate TATs, quota counters) before deciding anything.
  local tat_of = {}
  for i, limit in ipairs(spec.limits) do
    local tat = tats[limit.key]
    if not tat then
      local stored
      stored, refused = read_once(limit.key, 'string', 'GET', limit.key)
      if refused then
        return {SCRIPT_REFUSED, refused}
      end
      -- Text that is not a number (nan included) counts as no TAT, as if the key had expired.
      stored = tonumber(stored)
      tat = (stored and stored == stored) and math.max(stored, now) or now
      if tat > now + limit.period_ms then
        -- Never written so (a TAT is at most one period ahead): clamped, and repaired at the end of the
        -- run (what any admission would write), so the limit recovers within one period.
        tat = now + limit.period_ms
        tats[limit.key] = tat
      end
    end
    tat_of[i] = math.max(tat, now)
  end
  local used_of, held_of, held_counters = {}, {}, {}
  for i, term in ipairs(spec.terms) do
    local counts
    counts, refused = read_once(term.id, 'hash', 'HMGET', KEYS[QUOTA], term.used, term.held)
    if refused then
      return {SCRIPT_REFUSED, refused}
    end
    local held = counter_of(term.id, KEYS[QUOTA], term.held, counts[2])
    refused = problem_once(term.id, KEYS[QUOTA], term.used, counts[1]) or cannot_move(held, 0)
    if refused then
      return {SCRIPT_REFUSED, refused}
    end
    used_of[i], held_of[i], held_counters[i] = tonumber(counts[1]) or 0, held.value, held
  end
  -- Under a spend cap: what the period's flushes charged (flush.lua adds each settlement's charge).
  local charged = 0
  if spec.spend_cap then
    local id = KEYS[QUOTA] .. '\n' .. SPENT  -- no meter is named so (names start with a letter or digit)
    local raw
    raw, refused = read_once(id, 'hash', 'HGET', KEYS[QUOTA], SPENT)
    refused = refused or problem_once(id, KEYS[QUOTA], SPENT, raw)
    if refused then
      return {SCRIPT_REFUSED, refused}
    end
    charged = tonumber(raw) or 0
  end
  local charges_credits = spec.charges_credits
  local reserved = reserved_counter.value
  local pending_cost = 0
  if unsettled then
    local released, charged, freed = 0, {}, {}
    for i = 1, #spec.terms do
      charged[i], freed[i] = 0, 0
    end
    for _, change in ipairs(unsettled) do
      if not change[1] or redis.call('EXISTS', change[1]) == 0 then
        released = released + change[2]
        for i = 1, #spec.terms do
          charged[i] = charged[i] + change[1 + 2 * i]
          freed[i] = freed[i] + change[2 + 2 * i]
        end
      end
    end
    for i, term in ipairs(spec.terms) do
      local used = used_of[i]
      used_of[i] = used + charged[i]
      held_of[i] = math.max(0, held_of[i] - freed[i])
      pending_cost = pending_cost + (math.max(term.included, used_of[i]) - math.max(term.included, used)) * term.price
    end
    reserved = math.max(0, reserved - released)
  end
  local available = (tonumber(account[2]) or 0) - reserved - (charges_credits and pending_cost or 0)

  local n = spec.calls
  if uses then
    n = math.min(n, uses.value)  -- never more calls than uses left
  end
  -- The finished calls not flushed yet count as charged at these terms (as their credits do).
  charged = charged + pending_cost
  local d = decide(spec, tat_of, used_of, held_of, n, available, charged)
  if d.reason and n > 1 then
    repeat
      n = math.floor(n / 2)
      d = decide(spec, tat_of, used_of, held_of, n, available, charged)
    until not d.reason or n == 1
    if not d.reason and n > 1 then
      n = math.floor(n / 2)
      d = decide(spec, tat_of, used_of, held_of, n, available, charged)
    end
  end

  if d.reason then
    return reply(d, 0, d.reason, d.reason == 'rate_limited' and d.retry_ms or 0, 0, available, 0)
  end

  -- The writes cannot fail once these hold (plan meters are distinct, so each field moves once per call).
  local credits = d.credits
  local holds_any = false
  for i, term in ipairs(spec.terms) do
    if term.hold ~= 0 then
      refused = refused or cannot_move(held_counters[i], math.abs(term.hold * n))
      holds_any = true
    end
  end
  if credits ~= 0 then
    refused = refused or cannot_move(reserved_counter, math.abs(credits))
  end
  if credits ~= 0 or holds_any then
    refused = refused or expect(KEYS[RESERVATIONS], 'hash') or expect(KEYS[DEADLINES], 'zset')
  end
  if refused then
    return {SCRIPT_REFUSED, refused}
  end

  -- Admitted: what it writes joins the run's writes.
  for i, limit in ipairs(spec.limits) do
    tats[limit.key] = tat_of[i] + limit.interval * limit.cost * n
  end
  for i, counter in ipairs(held_counters) do
    local hold = spec.terms[i].hold * n
    counter.value, counter.net = counter.value + hold, counter.net + hold
  end
  reserved_counter.value, reserved_counter.net = reserved_counter.value + credits, reserved_counter.net + credits
  if uses then
    uses.value, uses.net = uses.value - n, uses.net - n
  end
  if holds_any then
    expire_at[KEYS[QUOTA]] = spec.expire_at
  end
  if credits ~= 0 or holds_any then
    local pending = spec.reservations
    local records, deadlines = pending[3], pending[4]
    records[#records + 1] = reservation_id
    records[#records + 1] = record_of(spec, n, credits)
    deadlines[#deadlines + 1] = spec.deadline
    deadlines[#deadlines + 1] = reservation_id
  end
  return reply(d, 1, '', 0, credits, available - credits, n)
end

local specs, key_pos, pos = {}, 1, 2
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
  specs[t] = parse(keys, args)
  pos = pos + 2 + arg_count
end
local replies = {}
for c = pos, #ARGV, 3 do
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
    replies[#replies + 1] = admit(specs[tonumber(ARGV[c])], ARGV[c + 1], unsettled)
  end
end

-- The run's writes: the counters first (an EXPIREAT must find the key they create).
for _, counter in ipairs(moved_order) do
  if counter.net ~= 0 then
    redis.call('HINCRBY', counter.key, counter.field, int(counter.net))
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
-- One command with many arguments, in slices (Lua's unpack takes a few thousand values at most).
local function call_sliced(command, key, args)
  for first = 1, #args, 1000 do
    redis.call(command, key, unpack(args, first, math.min(first + 999, #args)))
  end
end
for _, pending in pairs(reservations) do
  call_sliced('HSET', pending[1], pending[3])
  call_sliced('ZADD', pending[2], pending[4])
end
return replies
