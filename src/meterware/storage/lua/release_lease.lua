-- Give up a shard's lease, only if ARGV[1] still holds it. KEYS: lease.

if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
end
return 0
