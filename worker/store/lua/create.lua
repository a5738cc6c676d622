-- KEYS: record, schedule, partners, lane, company's partner ring, ring of companies, live
-- ARGV: id, now ms, grace ms, partner, company ('' = publish at intake: NOTIFY_DISPATCH=fifo),
--       request field pairs...
local state = redis.call('HGET', KEYS[1], 'state')
if state then
  return {0, state, redis.call('HGET', KEYS[1], 'gen')}
end
redis.call('HSET', KEYS[1], 'state', 'queued', 'gen', 1, 'attempt', 0, 'created', ARGV[2],
           'updated', ARGV[2])
set_pairs(KEYS[1], 6)
if ARGV[4] ~= 'default' then redis.call('HSET', KEYS[1], 'partner', ARGV[4]) end
-- One more message waiting for its company (gauges.lua's ``waiting``).
redis.call('ZINCRBY', '@COMPANY_WAITING@', 1, redis.call('HGET', KEYS[1], 'company') or 'default')
redis.call('SADD', KEYS[3], ARGV[4])
if ARGV[5] == '' then
  -- Published by the producer: on the schedule a grace period ahead, in case it never is.
  redis.call('ZADD', KEYS[2], tonumber(ARGV[2]) + tonumber(ARGV[3]), ARGV[1])
else
  -- Into its lane, durable in Redis; off the schedule until the dispatcher takes it (the mover
  -- would otherwise publish a backlog after the grace). A lane is in its company's ring, and a
  -- company in the ring of companies, exactly while it is not empty.
  if redis.call('RPUSH', KEYS[4], ARGV[1]) == 1 then
    if redis.call('RPUSH', KEYS[5], ARGV[4]) == 1 then redis.call('RPUSH', KEYS[6], ARGV[5]) end
  end
  redis.call('HINCRBY', KEYS[7], 'laned', 1)
end
return {1, 'queued', '1'}
