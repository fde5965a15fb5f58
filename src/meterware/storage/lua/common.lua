-- Shared helpers, prepended to every meterware script when it is loaded (storage/redis.py).

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

-- Give back what a reservation record holds: its meters' held units and its reserved credits.
-- A record is "customer live period_start credits meter hold meter hold ..." (names have no spaces).
local function release(record, customer_key, quota_key)
  local fields = words(record)
  for i = 5, #fields, 2 do
    local held = tonumber(fields[i + 1])
    if held ~= 0 then
      redis.call('HINCRBY', quota_key, fields[i] .. ':h', int(-held))
    end
  end
  local credits = tonumber(fields[4])
  if credits ~= 0 and redis.call('EXISTS', customer_key) == 1 then
    redis.call('HINCRBY', customer_key, 'reserved', int(-credits))
  end
end

-- Python's float floor division (CPython's float_floor_div), so the GCRA matches memory.py bit for bit:
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
