#!lua
-- Take or renew a rollup worker's claim on a shard. The fencing token grows only on a fresh claim, so a
-- commit from a worker that lost its claim is refused. Same as MemoryStorage.claim_shard (storage/memory/).
-- KEYS: claim, fence; ARGV: owner, ttl ms. Reply: the token, or nil while another owner holds the claim.

local stop, reply = preamble({KEYS[1], 'string', KEYS[2], 'string'})
if stop then
  return reply
end
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then
  return false
end
-- Checked before the INCR, so a SET that could not follow never leaves a grown fence behind.
local token = redis.call('GET', KEYS[2])
local refused = bad_counter(KEYS[2], nil, token, 1)
if not string.find(ARGV[2], '^[1-9]%d*$') then
  refused = refused or 'ERR claim ttl must be a whole number of ms, at least 1'
end
if refused then
  return redis.error_reply(refused)
end
if not holder or not token then
  token = redis.call('INCR', KEYS[2])
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return tonumber(token)
