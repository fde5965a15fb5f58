#!lua
-- Index a key by its hash unless a key has that hash already (two imports of one hash at once: the first
-- keeps it, the other is refused, never overwrites it). KEYS: the key-hash index entry
-- ARGV: its field, value pairs. Reply: 1 if indexed, 0 if the hash is taken.

local stop, reply = preamble({KEYS[1], 'hash'}, KEYS[1], false, 0)
if stop then
  return reply
end
redis.call('HSET', KEYS[1], unpack(ARGV))
return 1
