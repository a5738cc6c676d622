-- KEYS: record, schedule, dead letter, dead index, stats, live ; ARGV: id, now ms, grace ms
local req = redis.call('HGET', KEYS[3], 'req')
if not req then return false end
local reason = redis.call('HGET', KEYS[3], 'reason')
if reason then redis.call('HINCRBY', KEYS[6], 'dead:' .. reason, -1) end
local before = redis.call('HGET', KEYS[1], 'state')
shift(KEYS[6], before, 'queued')
local replays = tonumber(redis.call('HGET', KEYS[3], 'replays') or 0) + 1
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('HSET', KEYS[1], 'req', req, 'gen', 0, 'created', ARGV[2])
  adopt_partner(KEYS[1], req)
end
if not before or before == 'failed' or before == 'delivered' then waiting(KEYS[1], 1) end
local gen = redis.call('HINCRBY', KEYS[1], 'gen', 1)
redis.call('HSET', KEYS[1], 'state', 'queued', 'attempt', 0, 'replays', replays, 'lease', 0,
           'updated', ARGV[2])
-- A replay is an operator's "send it now": a deadline it had is gone with its letter.
redis.call('HDEL', KEYS[1], 'next', 'owner', 'reason', 'first', 'last', 'exp')
redis.call('PERSIST', KEYS[1])
redis.call('ZADD', KEYS[2], tonumber(ARGV[2]) + tonumber(ARGV[3]), ARGV[1])
redis.call('DEL', KEYS[3])
redis.call('ZREM', KEYS[4], ARGV[1])
redis.call('HINCRBY', KEYS[5], 'replayed', 1)
by_partner(KEYS[1], 'replayed')
return {tostring(gen), req}
