-- KEYS: record, schedule, partners ; ARGV: id, now ms, grace ms, partner, request field pairs...
local state = redis.call('HGET', KEYS[1], 'state')
if state then
  return {0, state, redis.call('HGET', KEYS[1], 'gen')}
end
redis.call('HSET', KEYS[1], 'state', 'queued', 'gen', 1, 'attempt', 0, 'created', ARGV[2],
           'updated', ARGV[2])
set_pairs(KEYS[1], 5)
if ARGV[4] ~= 'default' then redis.call('HSET', KEYS[1], 'partner', ARGV[4]) end
-- One more message waiting for its company (gauges.lua's ``waiting``).
redis.call('ZINCRBY', '@COMPANY_WAITING@', 1, redis.call('HGET', KEYS[1], 'company') or 'default')
redis.call('SADD', KEYS[3], ARGV[4])
redis.call('ZADD', KEYS[2], tonumber(ARGV[2]) + tonumber(ARGV[3]), ARGV[1])
return {1, 'queued', '1'}
