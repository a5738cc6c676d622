-- KEYS: record, schedule, live, dispatched counter
-- ARGV: id, gen, now ms, lease ms, owner, worker, task id, partner, request field pairs...
local now = tonumber(ARGV[3])
local state = redis.call('HGET', KEYS[1], 'state')
if not state then
  -- A task without a record: made by hand, or its record was lost. The task's copy of the
  -- request becomes the record, so it is tracked like any other.
  redis.call('HSET', KEYS[1], 'state', 'queued', 'gen', ARGV[2], 'attempt', 0, 'created', now)
  set_pairs(KEYS[1], 9)
  if ARGV[8] ~= 'default' then redis.call('HSET', KEYS[1], 'partner', ARGV[8]) end
  waiting(KEYS[1], 1)
  state = 'queued'
end
-- A dispatched message's task has left the queue: it no longer counts against the dispatch
-- depth, whatever this claim decides (exactly once: the flag goes with the count).
if redis.call('HDEL', KEYS[1], 'dq') == 1 and redis.call('DECR', KEYS[4]) < 0 then
  redis.call('SET', KEYS[4], 0)
end
if state == 'delivered' or state == 'failed' or state == 'cancelled' then
  return {'done', state}
end
if redis.call('HGET', KEYS[1], 'gen') ~= ARGV[2] then return {'stale', state} end
if state == 'inflight' and tonumber(redis.call('HGET', KEYS[1], 'lease') or 0) > now then
  return {'busy', state}
end
local lease = now + tonumber(ARGV[4])
local deadline = redis.call('HGET', KEYS[1], 'exp')
if deadline and now >= tonumber(deadline) then
  -- Past its deadline: taken (fenced like an attempt, none counted) only to be dead-lettered
  -- 'expired' by this owner; never posted.
  shift(KEYS[3], state, 'inflight')
  redis.call('HSET', KEYS[1], 'state', 'inflight', 'lease', lease, 'owner', ARGV[5],
             'worker', ARGV[6], 'task', ARGV[7], 'updated', now)
  redis.call('ZADD', KEYS[2], lease, ARGV[1])
  return {'expired', redis.call('HGET', KEYS[1], 'attempt') or '0', request_json(KEYS[1]),
          deadline}
end
local attempt = redis.call('HINCRBY', KEYS[1], 'attempt', 1)
shift(KEYS[3], state, 'inflight')
redis.call('HSET', KEYS[1], 'state', 'inflight', 'lease', lease, 'owner', ARGV[5],
           'worker', ARGV[6], 'task', ARGV[7], 'updated', now, 'last', now)
redis.call('HSETNX', KEYS[1], 'first', now)
redis.call('ZADD', KEYS[2], lease, ARGV[1])
return {'go', tostring(attempt), request_json(KEYS[1]), deadline or ''}
