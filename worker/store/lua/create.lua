-- KEYS: record, schedule, partners, lane, company's partner ring, ring of companies, live,
--       idempotency key (the record's own key when there is none)
-- ARGV: id, now ms, grace ms, partner, company ('' = publish at intake: NOTIFY_DISPATCH=fifo),
--       fingerprint ('' = no explicit idempotency key), window s, deadline ms ('' = none),
--       request field pairs...
if ARGV[6] ~= '' then
  -- An explicit key: the first request under it holds it for the window, in this same step, so
  -- two requests at once with the same key get one message.
  local held = redis.call('GET', KEYS[8])
  if held then
    local fingerprint, id = string.match(held, '^(%S+) (%S+)$')
    if fingerprint ~= ARGV[6] then return {2, 'conflict', id or ''} end
    -- The same body under the same key: the same id. Its record is gone only if an operator
    -- deleted its dead letter (the window is at most the status TTL, settings).
    return {0, redis.call('HGET', KEYS[1], 'state') or 'failed', redis.call('HGET', KEYS[1], 'gen')}
  end
  redis.call('SET', KEYS[8], ARGV[6] .. ' ' .. ARGV[1], 'EX', ARGV[7])
end
local state = redis.call('HGET', KEYS[1], 'state')
if state then
  return {0, state, redis.call('HGET', KEYS[1], 'gen')}
end
redis.call('HSET', KEYS[1], 'state', 'queued', 'gen', 1, 'attempt', 0, 'created', ARGV[2],
           'updated', ARGV[2])
set_pairs(KEYS[1], 9)
if ARGV[4] ~= 'default' then redis.call('HSET', KEYS[1], 'partner', ARGV[4]) end
local deadline = tonumber(ARGV[8])
if deadline then redis.call('HSET', KEYS[1], 'exp', ARGV[8]) end
-- One more message waiting for its company (gauges.lua's ``waiting``).
redis.call('ZINCRBY', '@COMPANY_WAITING@', 1, redis.call('HGET', KEYS[1], 'company') or 'default')
redis.call('SADD', KEYS[3], ARGV[4])
if ARGV[5] == '' then
  -- Published by the producer: on the schedule a grace period ahead, in case it never is (at
  -- its deadline if that comes first: the claim then makes it a dead letter on time).
  local due = tonumber(ARGV[2]) + tonumber(ARGV[3])
  if deadline and deadline < due then due = deadline end
  redis.call('ZADD', KEYS[2], due, ARGV[1])
else
  -- Into its lane, durable in Redis; off the schedule until the dispatcher takes it (the mover
  -- would otherwise publish a backlog after the grace). A lane is in its company's ring, and a
  -- company in the ring of companies, exactly while it is not empty.
  if redis.call('RPUSH', KEYS[4], ARGV[1]) == 1 then
    if redis.call('RPUSH', KEYS[5], ARGV[4]) == 1 then redis.call('RPUSH', KEYS[6], ARGV[5]) end
  end
  redis.call('HINCRBY', KEYS[7], 'laned', 1)
  -- A deadline puts it on the schedule too, at that time, so it expires on time even while its
  -- lane waits (a paused geolocation); the dispatcher passes over it once it is finished.
  if deadline then redis.call('ZADD', KEYS[2], deadline, ARGV[1]) end
end
return {1, 'queued', '1'}
