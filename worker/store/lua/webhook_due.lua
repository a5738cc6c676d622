-- KEYS: webhook schedule ; ARGV: now ms, limit, grace ms
-- The events due now, each pushed a grace period ahead (a task lost on the way is published
-- again after it; a second copy is fenced off by webhook_claim).
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
local later = tonumber(ARGV[1]) + tonumber(ARGV[3])
for _, id in ipairs(ids) do redis.call('ZADD', KEYS[1], later, id) end
return ids
