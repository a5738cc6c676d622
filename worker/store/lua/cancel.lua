-- A partner (or an operator) cancels a message that has not been posted: it ends 'cancelled'
-- and is never posted. Once an attempt is under way or over, it is refused (the state says why).
-- KEYS: record, schedule, live, dispatched counter, stats, history outbox
-- ARGV: id, partner ('' = any: an operator), now ms, status ttl s, history ('1' = on)
local r = redis.call('HMGET', KEYS[1], 'state', 'partner')
local state = r[1]
if not state or (ARGV[2] ~= '' and (r[2] or 'default') ~= ARGV[2]) then
  return {'missing', ''}  -- another partner's message is no message of this partner's
end
if state == 'cancelled' then return {'cancelled', state} end
if state ~= 'queued' and state ~= 'retrying' then return {'refused', state} end
shift(KEYS[3], state, 'cancelled')
waiting(KEYS[1], -1)
-- A dispatched message no longer counts against the dispatch depth (as its claim would do).
if redis.call('HDEL', KEYS[1], 'dq') == 1 and redis.call('DECR', KEYS[4]) < 0 then
  redis.call('SET', KEYS[4], 0)
end
-- A new generation: a task that already carries it is stale as well as finished (claim.lua).
redis.call('HINCRBY', KEYS[1], 'gen', 1)
redis.call('HSET', KEYS[1], 'state', 'cancelled', 'updated', ARGV[3], 'lease', 0)
redis.call('HDEL', KEYS[1], 'next', 'owner')
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[4])
redis.call('HINCRBY', KEYS[5], 'cancelled', 1)
by_partner(KEYS[1], 'cancelled')
if ARGV[5] == '1' then
  outbox(KEYS[6], KEYS[1], ARGV[1], attempt_count(KEYS[1]), ARGV[3], false, true)
end
return {'cancelled', state}
