-- Shared helpers, placed after the shebang line of each meterware script when it is loaded (redis/_scripts.py).

-- Integers go to Redis as decimal text: tostring() would print large numbers as 1e+15.
local function int(n)
  return string.format('%d', n)
end

-- Redis's clock in epoch milliseconds (effects are replicated, so reading it is safe in a script).
local function now_ms()
  local time = redis.call('TIME')
  return tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
end

-- Read ARGV (or any list) in order: each call returns the next element.
local function reader(list, start)
  local pos = start
  return function()
    pos = pos + 1
    return list[pos - 1]
  end
end

local function words(text)
  local out = {}
  for word in string.gmatch(text, '%S+') do
    out[#out + 1] = word
  end
  return out
end

-- All or nothing. Redis keeps the writes a script made before a command fails, so every writing script
-- reads and checks everything first and writes last: a check that fails makes the script reply with a
-- one-line error naming the key (redis.error_reply; StorageError in Python) before its first write.
-- Scripts whose checks depend on their own earlier changes plan their writes (plan, plan_incr), check
-- them (check_counters), then make them (apply). Out of memory, Redis refuses a script before it runs
-- (the #!lua shebang, without allow-oom).

local types = {}

-- The type of `key` when the script first asked (what it still is while nothing has been written).
local function type_of(key)
  local found = types[key]
  if not found then
    found = redis.call('TYPE', key)['ok']
    types[key] = found
  end
  return found
end

-- nil if `key` is absent or holds a `kind`; otherwise the error to reply with.
local function expect(key, kind)
  local found = type_of(key)
  if found ~= kind and found ~= 'none' then
    return 'WRONGTYPE ' .. key .. ' holds a ' .. found .. ', not a ' .. kind
  end
end

-- A read that doubles as the type check of its key (no TYPE round): reply, or nil and the error to reply
-- with (naming the key) when the key holds something else than a `kind`.
local function read(kind, command, key, ...)
  local reply = redis.pcall(command, key, ...)
  if type(reply) == 'table' and reply.err then
    return nil, expect(key, kind) or reply.err
  end
  return reply
end

-- Whether `key` existed when the script started (for scripts that write only at the end).
local function existed(key)
  return type_of(key) ~= 'none'
end

-- How most scripts start: every key of `checks` (key, kind, key, kind...) must be absent or hold its kind,
-- else the script stops with an error naming the first that does not; then, if `key` is given, it goes
-- on only if `key` exists (`exists` true) or is absent (false), else it stops with the reply `otherwise`.
-- Returns true and the reply to stop with, or nothing to go on.
local function preamble(checks, key, exists, otherwise)
  for i = 1, #checks, 2 do
    local problem = expect(checks[i], checks[i + 1])
    if problem then
      return true, redis.error_reply(problem)
    end
  end
  if key and existed(key) ~= exists then
    if not exists and type_of(key) == 'string' then
      -- A repeat of a write made once (its marker is there): write the marker again as it is, so that a
      -- WAIT after this script also covers the first write (newer Redis versions count WAIT from the
      -- connection's last write, not its last command).
      redis.call('SET', key, redis.call('GET', key), 'KEEPTTL')
    end
    return true, otherwise
  end
end

-- Redis counters are 64-bit; Lua numbers are doubles, exact below 2**53 (meterware bounds each amount
-- below that: config, usage.add and the worker, though a counter adds up many). A counter whose value
-- plus the sizes of all changes planned for it stays below 2**62 never leaves int64 on the way: doubles
-- below 2**63 are off by at most 2**10, far less than the margin. One that would go beyond is refused as
-- corrupt (4.6e18 micro-credits or units in one counter).
local COUNTER_LIMIT = 2 ^ 62

-- The quota hash's field of what the period's flushes charged (storage/_keyspace.py's SPENT_FIELD).
local SPENT = '@spent'

-- nil if INCRBY/HINCRBY can add changes of total size `moved` to `raw` (a field's text, or false if
-- absent) without failing: an integer as Redis parses it (digits after an optional minus, no leading
-- zero, space or plus sign), in range.
local function bad_counter(key, field, raw, moved)
  local problem
  if raw and raw ~= '0' and not string.find(raw, '^%-?[1-9]%d*$') then
    problem = ' is not an integer'
  elseif not (math.abs(tonumber(raw) or 0) + moved < COUNTER_LIMIT) then
    problem = ' would go beyond 2^62'
  end
  if problem then
    return 'BADVALUE ' .. (field and (key .. ' field ' .. field) or key) .. problem
  end
end

-- nil if `raw` (a field's text, or false) is absent or a number the script can compare.
local function bad_number(key, field, raw)
  local value = raw and tonumber(raw)
  if raw and (not value or value ~= value) then
    return 'BADVALUE ' .. key .. ' field ' .. field .. ' is not a number'
  end
end

local planned, counters, counter_order, incremented = {}, {}, {}, {}

-- Plan one write, made by apply() once every check has passed.
local function plan(...)
  planned[#planned + 1] = {...}
end

-- A hash field the plan increments: its text before the script (false if absent; `raw` if the script read
-- it already), the net change planned so far and the total size of the changes (how far it may move on
-- the way).
local function counter(key, field, raw)
  local id = key .. '\n' .. field
  local entry = counters[id]
  if not entry then
    if raw == nil then
      raw = redis.call('HGET', key, field)
    end
    entry = {key = key, field = field, raw = raw, start = tonumber(raw) or 0, net = 0, moved = 0}
    counters[id] = entry
    counter_order[#counter_order + 1] = entry
  end
  return entry
end

-- Plan HINCRBY (`incremented[key]`: the key exists once the plan is made). apply() makes one HINCRBY of
-- the net change per field, however many changes were planned for it (a batch moves a customer's
-- balance once, not once per call). `moved`: the total size of the changes `delta` sums, if several.
local function plan_incr(key, field, delta, moved)
  local entry = counter(key, field)
  entry.net = entry.net + delta
  entry.moved = entry.moved + (moved or math.abs(delta))
  incremented[key] = true
end

-- nil if every planned increment can be made.
local function check_counters()
  for _, entry in ipairs(counter_order) do
    local problem = bad_counter(entry.key, entry.field, entry.raw, entry.moved)
    if problem then
      return problem
    end
  end
end

local function apply()
  -- The increments first: an EXPIREAT planned for a key they create must find it.
  for _, entry in ipairs(counter_order) do
    if entry.moved ~= 0 then
      redis.call('HINCRBY', entry.key, entry.field, int(entry.net))
    end
  end
  for _, command in ipairs(planned) do
    redis.call(unpack(command))
  end
end

-- A reservation record is "customer live period_start credits meter hold meter hold ..." (names have no
-- spaces): its words, or nil and the error to reply with if it is not one.
local function reservation_fields(record, where)
  local fields = words(record)
  if #fields < 4 or #fields % 2 ~= 0 then
    return nil, 'BADVALUE ' .. where .. ' is not a reservation record'
  end
  for i = 4, #fields, 2 do
    if not string.find(fields[i], '^%-?%d+$') then
      return nil, 'BADVALUE ' .. where .. ' is not a reservation record'
    end
  end
  return fields
end

-- Plan giving back what a reservation record holds (its text, or its words): its meters' held units and
-- its reserved credits. Returns the error to reply with if the record is not one.
local function release(record, customer_key, quota_key, where)
  local fields, problem = record, nil
  if type(record) == 'string' then
    fields, problem = reservation_fields(record, where)
    if problem then
      return problem
    end
  end
  for i = 5, #fields, 2 do
    local held = tonumber(fields[i + 1])
    if held ~= 0 then
      plan_incr(quota_key, fields[i] .. ':h', -held)
    end
  end
  local credits = tonumber(fields[4])
  if credits ~= 0 and existed(customer_key) then
    plan_incr(customer_key, 'reserved', -credits)
  end
end

-- Python's float floor division (CPython's float_floor_div), so the GCRA matches MemoryStorage bit for bit:
-- math.floor(a / b) differs from a // b when a / b rounds up to a whole number.
local function floordiv(a, b)
  local mod = math.fmod(a, b)
  local div = (a - mod) / b
  if mod ~= 0 and (b < 0) ~= (mod < 0) then
    div = div - 1
  end
  if div == 0 then
    return 0
  end
  local floor = math.floor(div)
  if div - floor > 0.5 then
    floor = floor + 1
  end
  return floor
end

-- The fields of a ledger entry from 8 arguments starting at `at` (amount, kind, grant, actor, reason,
-- ref, priority, expires_ms): kind and amount always, the others only when set (as MemoryStorage reads them).
local function ledger_fields(list, at)
  local fields = {'k', list[at + 1], 'a', list[at]}
  local names = {'g', 'by', 'why', 'r', 'p', 'x'}
  for i, name in ipairs(names) do
    local value = list[at + 1 + i]
    if value ~= '' and value ~= '0' then
      fields[#fields + 1] = name
      fields[#fields + 1] = value
    end
  end
  return fields
end
