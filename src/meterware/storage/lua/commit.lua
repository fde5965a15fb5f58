#!lua
-- Commit one rollup step of a shard: add the aggregates, move dead letters aside and advance the offset,
-- at once, only for the lease holder that read from the current offset. Same as
-- MemoryStorage.commit_rollup (storage/memory/). All or nothing (common.lua): a first pass over the windows
-- reads and checks every key and field; a second pass writes, after the dead letters (appends, the one
-- write no check covers), and the offset comes last.
--
-- KEYS: fence, offset, events stream, dead-letter stream, then usage hashes and unique-value sets
-- ARGV: token, expected offset, new offset, window count, then per window: usage key index, ttl (s),
--       sum count, (field, amount)..., max count, (field, value)..., last count, (field, ms, value)...,
--       unique count, (field, set key index, value count, values...)...; then dead-letter count,
--       (entry id, reason)...
-- A usage hash holds s:<field> (sum), m:<field> (max), l:<field> + t:<field> (last value and its
-- timestamp) and u:<field> (marks that the unique-value set of <field> exists).

local stop, reply = preamble({KEYS[1], 'string', KEYS[2], 'string', KEYS[3], 'stream', KEYS[4], 'stream'})
if stop then
  return reply
end
if (redis.call('GET', KEYS[1]) or '0') ~= ARGV[1] or (redis.call('GET', KEYS[2]) or '0-0') ~= ARGV[2] then
  return 0
end

-- Check: every field a window touches is read at once (the read checks the hash's type too). Each field
-- appears once per commit, so what a check sees is what the write will find.
local refused
local stored = {}  -- per window, the fields read, in ARGV order
local arg = reader(ARGV, 4)
local windows = tonumber(arg())
for w = 1, windows do
  local usage_key = KEYS[tonumber(arg())]
  arg()  -- ttl
  local fields, amounts = {}, {}
  for i = 1, tonumber(arg()) do
    fields[i], amounts[i] = 's:' .. arg(), arg()
  end
  local sums = #fields
  for _ = 1, tonumber(arg()) do
    fields[#fields + 1] = 'm:' .. arg()
    arg()
  end
  for _ = 1, tonumber(arg()) do
    fields[#fields + 1] = 't:' .. arg()
    arg()
    arg()
  end
  local uniques = tonumber(arg())
  for _ = 1, uniques do
    arg()
    refused = expect(KEYS[tonumber(arg())], 'set')
    if refused then
      return redis.error_reply(refused)
    end
    for _ = 1, tonumber(arg()) do
      arg()
    end
  end
  -- A window with neither fields nor unique values only gets an EXPIRE, which cannot fail.
  local values = {}
  if #fields > 0 then
    values, refused = read('hash', 'HMGET', usage_key, unpack(fields))
  elseif uniques > 0 then
    refused = expect(usage_key, 'hash')
  end
  if refused then
    return redis.error_reply(refused)
  end
  for i = 1, #fields do
    if i <= sums then
      -- The amount goes to Redis as Python wrote it (exact); its double only serves the bound check.
      refused = bad_counter(usage_key, fields[i], values[i], math.abs(tonumber(amounts[i])))
    else
      refused = bad_number(usage_key, fields[i], values[i])
    end
    if refused then
      return redis.error_reply(refused)
    end
  end
  stored[w] = values
end

local dead_letters = {}
for _ = 1, tonumber(arg()) do
  local entry_id, reason = arg(), arg()
  local command = {'XADD', KEYS[4], '*'}
  -- pcall: an entry id that is not a stream id finds nothing (the stream's type is checked above).
  local found = redis.pcall('XRANGE', KEYS[3], entry_id, entry_id)
  if type(found) == 'table' and not found.err and found[1] then
    local fields = found[1][2]
    for i = 1, #fields, 2 do
      if fields[i] ~= 'entry' and fields[i] ~= 'reason' then
        command[#command + 1] = fields[i]
        command[#command + 1] = fields[i + 1]
      end
    end
  end
  command[#command + 1] = 'entry'
  command[#command + 1] = entry_id
  command[#command + 1] = 'reason'
  command[#command + 1] = reason
  dead_letters[#dead_letters + 1] = command
end

-- Write.
for _, command in ipairs(dead_letters) do
  redis.call(unpack(command))
end
local CHUNK = 1000  -- unpack() has a small stack: add set members in slices
arg = reader(ARGV, 5)
for w = 1, windows do
  local usage_key, ttl = KEYS[tonumber(arg())], tonumber(arg())
  local values, read_at = stored[w], 0
  for _ = 1, tonumber(arg()) do
    local field, amount = 's:' .. arg(), arg()
    read_at = read_at + 1
    redis.call('HINCRBY', usage_key, field, amount)
  end
  for _ = 1, tonumber(arg()) do
    local field, value = 'm:' .. arg(), arg()
    read_at = read_at + 1
    local current = values[read_at]
    if not current or tonumber(value) > tonumber(current) then
      redis.call('HSET', usage_key, field, value)
    end
  end
  for _ = 1, tonumber(arg()) do
    local name, stamp, value = arg(), arg(), arg()
    read_at = read_at + 1
    local current = values[read_at]
    if not current or tonumber(current) <= tonumber(stamp) then
      redis.call('HSET', usage_key, 'l:' .. name, value, 't:' .. name, stamp)
    end
  end
  for _ = 1, tonumber(arg()) do
    local name, set_key = arg(), KEYS[tonumber(arg())]
    local members = {}
    for i = 1, tonumber(arg()) do
      members[i] = arg()
    end
    redis.call('HSET', usage_key, 'u:' .. name, '1')
    for first = 1, #members, CHUNK do
      redis.call('SADD', set_key, unpack(members, first, math.min(first + CHUNK - 1, #members)))
    end
    if ttl > 0 then
      redis.call('EXPIRE', set_key, ttl)
    end
  end
  if ttl > 0 then
    redis.call('EXPIRE', usage_key, ttl)
  end
end
redis.call('SET', KEYS[2], ARGV[3])
return 1
