-- KEYS: record, schedule, stats, live, history outbox
-- ARGV: id, owner, now ms, due ms, attempt at ms ('' = none), attempt rest, history
if redis.call('HGET', KEYS[1], 'state') ~= 'inflight'
   or redis.call('HGET', KEYS[1], 'owner') ~= ARGV[2] then
  return 0  -- this worker lost the message (its lease ran out); the new holder decides
end
if ARGV[5] ~= '' then
  local k = add_attempt(KEYS[1], ARGV[5], ARGV[6])
  if ARGV[7] == '1' then outbox(KEYS[5], KEYS[1], ARGV[1], k, ARGV[5], ARGV[6], false) end
end
local gen = redis.call('HINCRBY', KEYS[1], 'gen', 1)
-- Due again no later than its deadline, when it is dead-lettered 'expired' (claim.lua): a message
-- waiting out a backoff, a breaker, a rate limit or a token outage expires on time.
local due = ARGV[4]
local deadline = redis.call('HGET', KEYS[1], 'exp')
if deadline and tonumber(deadline) < tonumber(due) then due = deadline end
-- Nothing was posted: give back the attempt the claim counted.
if redis.call('HINCRBY', KEYS[1], 'attempt', -1) <= 0 then
  redis.call('HSET', KEYS[1], 'attempt', 0)
  redis.call('HDEL', KEYS[1], 'first', 'last')
end
redis.call('HSET', KEYS[1], 'state', 'retrying', 'next', due, 'updated', ARGV[3], 'lease', 0)
redis.call('HDEL', KEYS[1], 'owner')
redis.call('ZADD', KEYS[2], due, ARGV[1])
redis.call('HINCRBY', KEYS[3], 'deferred', 1)
by_partner(KEYS[1], 'deferred')
shift(KEYS[4], 'inflight', 'retrying')
return gen
