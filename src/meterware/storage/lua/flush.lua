#!lua
-- Flush one batch: append it to the shard's stream and settle each event's reservation (charge billable
-- calls, refund the rest), at once and only once per batch id. Same as MemoryStorage.flush (storage/memory/).
-- All or nothing (common.lua): the settlements are planned and checked first; then the append (the one
-- write no check covers: a stream out of ids) comes before the batch marker and the settlement writes.
-- Each call's cost is added to its period's spend (the quota hash's SPENT field, postpaid too).
-- Each customer charged gets one `charge` entry in its credits ledger for the batch (amount: minus the
-- batch's charges, ref: the batch id), appended with the batch, so its balance stays the ledger's sum.
--
-- The client sends the settlements grouped: a batch holds many calls of few customers, so a "term" holds
-- what calls of the same customer, live flag, period, flags and meters share, and each event names its
-- term. Per event, the script only adds its units to the counters and works out its cost; keys, checks
-- and charges are per term and customer, and only reservations are looked up one by one.
--
-- Most batches hold no call that crosses its included units: each counter starts past them (or has
-- none) and only grows, so every call of a term costs its units times their prices. The client sends the
-- costs text such a batch has; the script checks that it holds and then works per term, never per event.
--
-- A value of one customer that the settlement cannot work with (a key of theirs of the wrong type, a
-- counter that is not an integer, a reservation record of one of their calls that is not one) refuses the
-- batch with the reply {customer key, error} instead of an error, before the first write: the client
-- flushes the rest of the batch without that customer's calls and sets theirs aside, so one clobbered
-- value never stops the billing of a whole shard. What is wrong with the batch itself, or with the keys
-- of the shard, refuses it whole (an error reply).
--
-- KEYS: batch marker, events stream, reservations, reservation deadlines, then customer and quota keys
-- ARGV: batch id, payload, marker ttl (s), then three msgpack arrays (one argument each, not thousands:
--       Redis and the client pay per argument):
--       terms: per term, its number, its event count, customer key index, ledger key index, quota key
--         index, quota expire-at (s), billable (1/0), charges credits (1/0), meter count, (meter, units,
--         price, included)...;
--       events: per event, its term's number (the position of the term's first event; an event that
--         settles nothing names a number no term has);
--       reservations: (reservation id, term number, event number, closes (1/0))... of the events that
--         name one: a call closes its own reservation (or, the last call of a lease, its block's); the
--         other calls of a lease capture their share of the block's (their units and cost, at most what
--         it still holds), so a settled call is never counted both as used and as held;
--       then the costs text if every call costs its units times their prices ("" if not offered);
--       then the KEYS index of the key holding the highest generation written of the batches of the
--       process that made this one ("0": unknown) and this batch's generation (Batch.generation);
--       then a msgpack array of (event number, KEYS index of its one-use marker)... of the records;
--       then, only when some call settles a meter rate limit, a msgpack array of (KEYS index of its
--       rate key, amount, seconds, units to move it by: the calls' actual units less their estimates,
--       KEYS index of its customer key)...
--       A term of no event (its event count 0) closes the reservations that name it and bills nothing:
--       the releases of the records taken out of the batch (storage/_once.py).
--
-- Records are charged once (Settlement.once): the marker of each record is set with its charge, so a
-- record is either charged and marked, or neither. A batch holding a record whose marker is set (or set
-- by an earlier record of the batch) is answered {'DUPLICATES', event number...} before the first write;
-- the client flushes it again without them.

local stop, reply = preamble({KEYS[1], 'string'}, KEYS[1], false, 0)
if stop then
  return reply
end
local refused = expect(KEYS[2], 'stream') or expect(KEYS[3], 'hash') or expect(KEYS[4], 'zset')
if refused then
  return redis.error_reply(refused)
end

-- ARGV[10] is absent from the calls of a client from before records were charged once.
local markers, marked, duplicates = ARGV[10] and cmsgpack.unpack(ARGV[10]) or {}, {}, {'DUPLICATES'}
for i = 1, #markers, 2 do
  local key = KEYS[markers[i + 1]]
  if marked[key] or redis.call('EXISTS', key) == 1 then
    duplicates[#duplicates + 1] = markers[i]
  end
  marked[key] = true
end
if #duplicates > 1 then
  return duplicates
end

-- common.lua's counter(), first read (if the script has not read it yet) with a read that doubles as the
-- hash's type check: the entry, or nil and the error to reply with.
local function checked_counter(key, field, raw)
  if raw == nil and not counters[key .. '\n' .. field] then
    local problem
    raw, problem = read('hash', 'HGET', key, field)
    if problem then
      return nil, problem
    end
  end
  return counter(key, field, raw)
end

-- A settlement's numbers come from the client, and from a spool file on disk at worst: units, prices,
-- included units and a call's cost per meter must be integers from 0 to 2^53-1 (a negative price would
-- credit the call's cost instead of charging it), and the costs text a list of such integers.
local MAX_AMOUNT = 2 ^ 53 - 1

local function bad_amount(customer_key, meter, name, value)
  if type(value) ~= 'number' or value < 0 or value > MAX_AMOUNT or value ~= math.floor(value) then
    return 'BADVALUE batch ' .. ARGV[1] .. ' customer key ' .. customer_key .. ' meter ' .. tostring(meter) ..
      ': ' .. name .. ' ' .. tostring(value) .. ' is not an integer from 0 to 2^53-1'
  end
end

local function bad_meter(customer_key, meter, units, price, included)
  if type(meter) ~= 'string' then
    return 'BADVALUE batch ' .. ARGV[1] .. ' customer key ' .. customer_key .. ': a meter name is not text'
  end
  return bad_amount(customer_key, meter, 'units', units) or bad_amount(customer_key, meter, 'price', price)
    or bad_amount(customer_key, meter, 'included', included)
    or bad_amount(customer_key, meter, 'cost', units * price)
end

-- The customer key of each customer, ledger and quota key (whose customer a refusal names).
local owners = {}

local function refuse(key, problem)
  return {owners[key] or key, problem}
end

local terms, term_order, expiries, expiry_order, accounts, balances = {}, {}, {}, {}, {}, {}
local paid = ARGV[7] ~= ''  -- while every counter the batch moves starts past its included units
local list, at = cmsgpack.unpack(ARGV[4]), 1
while list[at] do
  local number, events = list[at], list[at + 1]
  local customer_key, ledger_key, quota_key = KEYS[list[at + 2]], KEYS[list[at + 3]], KEYS[list[at + 4]]
  local expire_at, billable, charges_credits = list[at + 5], list[at + 6] == 1, list[at + 7] == 1
  at = at + 9
  owners[customer_key], owners[ledger_key], owners[quota_key] = customer_key, customer_key, customer_key
  -- Every customer hash holds a balance: one found proves the key is a customer's.
  local balance = balances[customer_key]
  if balance == nil then
    local problem
    balance, problem = read('hash', 'HGET', customer_key, 'balance')
    if problem then
      return refuse(customer_key, problem)
    end
    balances[customer_key] = balance
    if balance then
      types[customer_key] = 'hash'
    end
  end
  -- meters: (counter, units, price, included)... of the units a billable call adds; names: their meters.
  local term = {customer = customer_key, quota = quota_key, events = events, cost = 0, spent = 0}
  local meters, names = {}, {}
  for j = at, at + 4 * list[at - 1] - 1, 4 do
    local units, price, included = list[j + 1], list[j + 2], list[j + 3]
    refused = bad_meter(customer_key, list[j], units, price, included)
    if refused then
      return redis.error_reply(refused)
    end
    if billable and units ~= 0 then
      local entry
      entry, refused = checked_counter(quota_key, list[j] .. ':u')
      if refused then
        return refuse(customer_key, refused)
      end
      meters[#meters + 1] = entry
      meters[#meters + 1] = units
      meters[#meters + 1] = price
      meters[#meters + 1] = included
      names[#names + 1] = list[j]
      incremented[quota_key] = true
      paid = paid and units > 0 and entry.start >= included
      term.cost = term.cost + units * price
    end
  end
  at = at + 4 * list[at - 1]
  refused = (#meters == 0 and expect(quota_key, 'hash')) or expect(ledger_key, 'stream')
  if refused then
    return refuse(customer_key, refused)
  end
  term.meters, term.names = meters, names
  -- Usage recorded without an admission (served fail-open) still needs the quota hash to expire.
  if billable and not expiries[quota_key] then
    expiries[quota_key] = expire_at
    expiry_order[#expiry_order + 1] = quota_key
  end
  if billable and charges_credits and existed(customer_key) then
    local account = accounts[customer_key]
    if not account then
      account = {key = customer_key, balance = balance, ledger = ledger_key, net = 0, moved = 0}
      accounts[customer_key] = account
    end
    term.account = account
  end
  terms[number] = term
  term_order[#term_order + 1] = term
end

if ARGV[7] ~= '' and (string.find(ARGV[7], '[^%d,]') or string.find(',' .. ARGV[7] .. ',', ',,')
    or string.find(ARGV[7], '%d%d%d%d%d%d%d%d%d%d%d%d%d%d%d')) then
  return redis.error_reply('BADVALUE batch ' .. ARGV[1] .. ' costs are not integers from 0 to 10^14-1')
end

local costs, charged_order, event_costs = ARGV[7], {}, nil

-- A billable call's cost is spend, charged to credits or not (postpaid): the period's quota hash sums it
-- (SPENT, the spend cap's count) in the same step, so the cap counts each call at the price it paid.
local function charge(term, cost)
  if cost ~= 0 then
    term.spent = term.spent + cost
    local account = term.account
    if account then
      if account.moved == 0 then
        charged_order[#charged_order + 1] = account
      end
      account.net = account.net + cost
      account.moved = account.moved + math.abs(cost)
    end
  end
end

if paid then
  -- Terms in the order of their first events: the customers' charges come in the same order.
  for _, term in ipairs(term_order) do
    local meters, events = term.meters, term.events
    for j = 1, #meters, 4 do
      local entry, units = meters[j], meters[j + 1]
      entry.net = entry.net + events * units
      entry.moved = entry.moved + events * units
    end
    charge(term, events * term.cost)
  end
else
  -- Each event's units move its term's counters in stream order: a call's cost is what it adds past
  -- the included units, so it depends on the calls before it.
  costs, event_costs = {}, {}
  local events = cmsgpack.unpack(ARGV[5])
  for i = 1, #events do
    local cost = 0
    local term = terms[events[i]]
    if term then
      local meters = term.meters
      for j = 1, #meters, 4 do
        local entry, units, price, included = meters[j], meters[j + 1], meters[j + 2], meters[j + 3]
        local before = entry.start + entry.net
        entry.net = entry.net + units
        entry.moved = entry.moved + math.abs(units)
        cost = cost + (math.max(included, before + units) - math.max(included, before)) * price
      end
      charge(term, cost)
      event_costs[i] = cost
      -- The calls of a term mostly cost the same: its last cost's text is reused.
      if cost ~= term.last then
        term.last, term.text = cost, int(cost)
      end
      costs[i] = term.text
    else
      costs[i] = '0'
    end
  end
  costs = table.concat(costs, ',')
end
for _, term in ipairs(term_order) do
  if term.spent ~= 0 then
    plan_incr(term.quota, SPENT, term.spent)
  end
end
for _, account in ipairs(charged_order) do
  local balance = checked_counter(account.key, 'balance', account.balance)
  balance.net = balance.net - account.net
  balance.moved = balance.moved + account.moved
  incremented[account.key] = true
end

-- The settlement names the reservation's own customer, mode and period (both come from the admission).
-- A call served without a reservation (fail-open, or a lease's whose block is gone) has none to look up.
local entries, ids, records, closed, captured = cmsgpack.unpack(ARGV[6]), {}, {}, {}, {}
local holders = {}  -- reservation id -> the customer key of the first call naming it
for at = 1, #entries, 4 do
  local reservation_id = entries[at]
  if records[reservation_id] == nil then
    records[reservation_id] = false
    ids[#ids + 1] = reservation_id
    holders[reservation_id] = terms[entries[at + 1]] and terms[entries[at + 1]].customer
  end
end
local CHUNK = 1000  -- unpack() has a small stack: ask for the records in slices
for first = 1, #ids, CHUNK do
  local last = math.min(first + CHUNK - 1, #ids)
  local found = redis.call('HMGET', KEYS[3], unpack(ids, first, last))
  for i = first, last do
    local record = found[i - first + 1]
    if record then
      local fields, problem = reservation_fields(record, KEYS[3] .. ' field ' .. ids[i])
      if problem then
        return holders[ids[i]] and refuse(holders[ids[i]], problem) or redis.error_reply(problem)
      end
      records[ids[i]] = fields
    end
  end
end
for at = 1, #entries, 4 do
  local reservation_id, term = entries[at], terms[entries[at + 1]]
  local fields = records[reservation_id]
  if fields and term then
    if entries[at + 3] == 1 then
      refused = release(fields, term.customer, term.quota, KEYS[3] .. ' field ' .. reservation_id)
      if refused then
        return refuse(term.customer, refused)
      end
      records[reservation_id] = false
      closed[#closed + 1] = reservation_id
    elseif #term.names > 0 then
      -- A lease's call takes its units and its cost out of the block: at most what the block still holds.
      -- (Only leases of calls whose meters all count calls capture: a call's units are its own hold.)
      for m = 1, #term.names do
        for i = 5, #fields, 2 do
          if fields[i] == term.names[m] then
            local take = math.min(term.meters[4 * m - 2], tonumber(fields[i + 1]))
            if take > 0 then
              plan_incr(term.quota, fields[i] .. ':h', -take)
              fields[i + 1] = int(tonumber(fields[i + 1]) - take)
              fields.changed = true
            end
          end
        end
      end
      local cost = event_costs and event_costs[entries[at + 2]] or term.cost
      local take = math.min(cost, tonumber(fields[4]))
      if take > 0 then
        if existed(term.customer) then
          plan_incr(term.customer, 'reserved', -take)
        end
        fields[4] = int(tonumber(fields[4]) - take)
        fields.changed = true
      end
      if fields.changed and not captured[reservation_id] then
        captured[reservation_id] = true
        captured[#captured + 1] = reservation_id
      end
    end
  end
end
for _, reservation_id in ipairs(captured) do
  local fields = records[reservation_id]
  if fields then  -- not closed by a later call of the batch
    plan('HSET', KEYS[3], reservation_id, table.concat(fields, ' '))
  end
end
for first = 1, #closed, CHUNK do
  local slice = {unpack(closed, first, math.min(first + CHUNK - 1, #closed))}
  plan('HDEL', KEYS[3], unpack(slice))
  plan('ZREM', KEYS[4], unpack(slice))
end

-- A quota hash that exists after the batch without an expiry gets one (HINCRBY never removes one).
for _, quota_key in ipairs(expiry_order) do
  local ttl = redis.call('TTL', quota_key)
  if ttl == -1 or (ttl == -2 and incremented[quota_key]) then
    plan('EXPIREAT', quota_key, int(expiries[quota_key]))
  end
end

for _, entry in ipairs(counter_order) do
  refused = bad_counter(entry.key, entry.field, entry.raw, entry.moved)
  if refused then
    return refuse(entry.key, refused)
  end
end

-- The meter rate limits: each moves by what its calls used beyond (or short of) the estimates their
-- admissions took, from where the bucket stands, never below now (a full bucket) nor more than a period
-- ahead (metering/admission.py's moved_tat; MemoryStorage the same).
local rate_tats, rate_order = {}, {}
if ARGV[11] then
  local now = now_ms()
  local list = cmsgpack.unpack(ARGV[11])
  for at = 1, #list, 5 do
    local key, amount, seconds, units = KEYS[list[at]], list[at + 1], list[at + 2], list[at + 3]
    local period_ms = seconds * 1000
    local tat = rate_tats[key]
    if tat == nil then
      local stored, problem = read('string', 'GET', key)
      if problem then
        return refuse(KEYS[list[at + 4]], problem)
      end
      tat = tonumber(stored)
      rate_order[#rate_order + 1] = key
    end
    tat = (tat and tat == tat) and math.min(math.max(tat, now), now + period_ms) or now
    rate_tats[key] = math.min(math.max(tat + units * period_ms / amount, now), now + period_ms)
  end
  for _, key in ipairs(rate_order) do
    local tat = rate_tats[key]
    rate_tats[key] = tat > now and {string.format('%.17g', tat), int(math.max(1, math.ceil(tat - now)))} or false
  end
end
redis.call('XADD', KEYS[2], '*', 'b', ARGV[2], 'c', costs, 'i', ARGV[1])
for _, account in ipairs(charged_order) do
  redis.call('XADD', account.ledger, '*', 'k', 'charge', 'a', int(-account.net), 'r', ARGV[1])
end
redis.call('SET', KEYS[1], '1', 'EX', ARGV[3])
for i = 2, #markers, 2 do
  redis.call('SET', KEYS[markers[i]], '1', 'EX', ARGV[3])
end
apply()
for _, key in ipairs(rate_order) do
  local tat = rate_tats[key]
  if tat then
    redis.call('SET', key, tat[1], 'PX', tat[2])
  else
    redis.call('DEL', key)  -- a full bucket, as no key
  end
end
-- The highest generation written of the batches of the process that made this one (admit.lua's guard).
if ARGV[8] and ARGV[8] ~= '0' then
  local key = KEYS[tonumber(ARGV[8])]
  local written = redis.pcall('GET', key)
  if type(written) ~= 'table' and tonumber(ARGV[9]) > (tonumber(written) or 0) then
    redis.call('SET', key, ARGV[9], 'EX', ARGV[3])
  end
end
return 1
