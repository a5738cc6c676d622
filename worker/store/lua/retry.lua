-- KEYS: record, schedule, stats, live, history outbox
-- ARGV: id, owner, now ms, due ms, attempt at ms, attempt rest, status, cid, history
if redis.call('HGET', KEYS[1], 'state') ~= 'inflight'
   or redis.call('HGET', KEYS[1], 'owner') ~= ARGV[2] then
  return 0  -- this worker lost the message (its lease ran out); the new holder decides
end
local gen = redis.call('HINCRBY', KEYS[1], 'gen', 1)
redis.call('HSET', KEYS[1], 'state', 'retrying', 'next', ARGV[4], 'status', ARGV[7],
           'cid', ARGV[8], 'updated', ARGV[3], 'lease', 0)
redis.call('HDEL', KEYS[1], 'owner')
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[1])
local k = add_attempt(KEYS[1], ARGV[5], ARGV[6])
redis.call('HINCRBY', KEYS[3], 'retried', 1)
by_partner(KEYS[1], 'retried')
shift(KEYS[4], 'inflight', 'retrying')
if ARGV[9] == '1' then outbox(KEYS[5], KEYS[1], ARGV[1], k, ARGV[5], ARGV[6], false) end
return gen
