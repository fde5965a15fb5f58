-- Commit one rollup step of a shard: add the aggregates, move dead letters aside and advance the offset,
-- at once, only for the lease holder that read from the current offset. Same as
-- MemoryStorage.commit_rollup (memory.py).
--
-- KEYS: fence, offset, events stream, dead-letter stream, then usage hashes and unique-value sets
-- ARGV: token, expected offset, new offset, window count, then per window: usage key index, ttl (s),
--       sum count, (field, amount)..., max count, (field, value)..., last count, (field, ms, value)...,
--       unique count, (field, set key index, value count, values...)...; then dead-letter count,
--       (entry id, reason)...
-- A usage hash holds s:<field> (sum), m:<field> (max), l:<field> + t:<field> (last value and its
-- timestamp) and u:<field> (marks that the unique-value set of <field> exists).

if (redis.call('GET', KEYS[1]) or '0') ~= ARGV[1] or (redis.call('GET', KEYS[2]) or '0-0') ~= ARGV[2] then
  return 0
end

local CHUNK = 1000  -- unpack() has a small stack: add set members in slices
local arg = reader(ARGV, 4)
for _ = 1, tonumber(arg()) do
  local usage_key, ttl = KEYS[tonumber(arg())], tonumber(arg())
  for _ = 1, tonumber(arg()) do
    local name, amount = arg(), arg()
    redis.call('HINCRBY', usage_key, 's:' .. name, amount)
  end
  for _ = 1, tonumber(arg()) do
    local field, value = 'm:' .. arg(), arg()
    local current = redis.call('HGET', usage_key, field)
    if not current or tonumber(value) > tonumber(current) then
      redis.call('HSET', usage_key, field, value)
    end
  end
  for _ = 1, tonumber(arg()) do
    local name, stamp, value = arg(), arg(), arg()
    local current = redis.call('HGET', usage_key, 't:' .. name)
    if not current or tonumber(current) <= tonumber(stamp) then
      redis.call('HSET', usage_key, 'l:' .. name, value, 't:' .. name, stamp)
    end
  end
  for _ = 1, tonumber(arg()) do
    local name, set_key = arg(), KEYS[tonumber(arg())]
    local values = {}
    for i = 1, tonumber(arg()) do
      values[i] = arg()
    end
    redis.call('HSET', usage_key, 'u:' .. name, '1')
    for first = 1, #values, CHUNK do
      redis.call('SADD', set_key, unpack(values, first, math.min(first + CHUNK - 1, #values)))
    end
    if ttl > 0 then
      redis.call('EXPIRE', set_key, ttl)
    end
  end
  if ttl > 0 then
    redis.call('EXPIRE', usage_key, ttl)
  end
end

for _ = 1, tonumber(arg()) do
  local entry_id, reason = arg(), arg()
  local command = {'XADD', KEYS[4], '*'}
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
  redis.call(unpack(command))
end

redis.call('SET', KEYS[2], ARGV[3])
return 1
