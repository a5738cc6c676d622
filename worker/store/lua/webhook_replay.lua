-- KEYS: event, webhook schedule, webhook dead index ; ARGV: id, now ms
-- A webhook dead letter back to pending, due now, its attempts counted afresh.
if redis.call('HGET', KEYS[1], 'state') ~= 'dead' then return 0 end
redis.call('HSET', KEYS[1], 'state', 'pending', 'n', 0, 'next', ARGV[2])
redis.call('HDEL', KEYS[1], 'dead', 'why')
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('ZADD', KEYS[2], ARGV[2], ARGV[1])
return 1
