#!lua
-- Fire an alert at most once. KEYS: its marker, the shard's alerts stream.
-- ARGV: expires_at (epoch seconds, for the marker), the stream's length cap, then field, value, ...
-- Reply: the new entry id, or false (the marker exists: the alert fired already; only the marker is
-- written again, as it is: common.lua's preamble).

local stop, reply = preamble({KEYS[2], 'stream'}, KEYS[1], false, false)
if stop then
  return reply
end
local command = {'XADD', KEYS[2], 'MAXLEN', ARGV[2], '*'}
for index = 3, #ARGV do
  command[#command + 1] = ARGV[index]
end
-- The append comes first: it is the one write no check covers (a stream out of ids).
local id = redis.call(unpack(command))
redis.call('SET', KEYS[1], id, 'EXAT', ARGV[1])
return id
