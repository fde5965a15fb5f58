#!lua
-- Append backfilled events to the shard's stream as one entry, unless any of them was imported before
-- (then nothing: the caller leaves those out and retries). Imported events charge no credits (cost 0).
-- Same as MemoryStorage.import_events (storage/memory/).
-- KEYS: imported hash (event id -> entry id), events stream
-- ARGV: payload, costs, entry tag, then the event ids
-- Reply: 1 if appended, 0 if an event was already imported.

local stop, reply = preamble({KEYS[1], 'hash', KEYS[2], 'stream'})
if stop then
  return reply
end
for i = 4, #ARGV do
  if redis.call('HEXISTS', KEYS[1], ARGV[i]) == 1 then
    return 0
  end
end
local entry = redis.call('XADD', KEYS[2], '*', 'b', ARGV[1], 'c', ARGV[2], 'i', ARGV[3])
for i = 4, #ARGV do
  redis.call('HSET', KEYS[1], ARGV[i], entry)
end
return 1
