#!lua
-- Refund reservations that were never settled (the app died mid-call). Each one is released only if it
-- still exists, so a reservation settled since it was listed is left alone. Reply: how many were refunded.
-- All or nothing (common.lua): every release is planned and checked before the first write.
-- KEYS: reservations, reservation deadlines, then customer and quota keys
-- ARGV: (reservation id, customer key index, quota key index)..., then 'due' when the worker refunds the
--       reservations due_reservations.lua listed: only those still past their deadline are refunded (a
--       running call's process may have renewed one since it was listed).

local refused = expect(KEYS[1], 'hash') or expect(KEYS[2], 'zset')
for i = 3, #KEYS do
  refused = refused or expect(KEYS[i], 'hash')
end
if refused then
  return redis.error_reply(refused)
end

local due_only = #ARGV % 3 == 1 and ARGV[#ARGV] == 'due'
local now = due_only and now_ms()
local refunded, released = 0, {}
for i = 1, #ARGV - (due_only and 1 or 0), 3 do
  local id = ARGV[i]
  local record = not released[id] and redis.call('HGET', KEYS[1], id)
  local deadline = due_only and record and redis.call('ZSCORE', KEYS[2], id)
  if deadline and tonumber(deadline) > now then
    record = false  -- renewed since it was listed: its call is still running
  else
    plan('ZREM', KEYS[2], id)
  end
  if record then
    released[id] = true
    plan('HDEL', KEYS[1], id)
    local customer_key, quota_key = KEYS[tonumber(ARGV[i + 1])], KEYS[tonumber(ARGV[i + 2])]
    refused = release(record, customer_key, quota_key, KEYS[1] .. ' field ' .. id)
    if refused then
      return redis.error_reply(refused)
    end
    refunded = refunded + 1
  end
end

refused = check_counters()
if refused then
  return redis.error_reply(refused)
end
apply()
return refunded
