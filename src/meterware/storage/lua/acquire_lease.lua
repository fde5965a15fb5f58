-- Take or renew the lease of a shard's rollup. The fencing token grows only on a fresh acquisition, so a
-- commit from a worker that lost the lease is refused. Same as MemoryStorage.acquire_lease (memory.py).
-- KEYS: lease, fence; ARGV: owner, ttl ms. Reply: the token, or nil while another owner holds the lease.

local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then
  return false
end
local token = holder and redis.call('GET', KEYS[2])
if not token then
  token = redis.call('INCR', KEYS[2])
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return tonumber(token)
