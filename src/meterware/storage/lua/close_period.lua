#!lua
-- Freeze the invoice of a closed billing period, once. KEYS: the invoice (string), the customer's billed
-- hash. ARGV: the invoice (JSON), the billed version it was computed from, then period start, billed
-- record (JSON) pairs. Reply: 1 closed, 0 an invoice was frozen already, -1 the billed version moved since
-- (another close billed something meanwhile): nothing is written in either case.

local stop, reply = preamble({KEYS[1], 'string', KEYS[2], 'hash'}, KEYS[1], false, 0)
if stop then
  return reply
end
local version = redis.call('HGET', KEYS[2], 'v')
local refused = bad_counter(KEYS[2], 'v', version, 1)
if refused then
  return redis.error_reply(refused)
end
if (tonumber(version) or 0) ~= tonumber(ARGV[2]) then
  return -1
end
redis.call('SET', KEYS[1], ARGV[1])
if #ARGV > 2 then
  redis.call('HSET', KEYS[2], unpack(ARGV, 3))
end
redis.call('HINCRBY', KEYS[2], 'v', 1)
return 1
