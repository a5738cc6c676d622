-- KEYS: record, schedule, dead letter, dead index, stats, live, history outbox
-- ARGV: id, owner ('' = no owner check), now ms, attempt at ms ('' = no attempt),
--       request json (if no record), reason, detail, status, errors json, cid, task, worker,
--       attempt rest, partner of the request, history, webhook event id ('' = none)
local state = redis.call('HGET', KEYS[1], 'state')
if ARGV[2] ~= '' and (state ~= 'inflight' or redis.call('HGET', KEYS[1], 'owner') ~= ARGV[2]) then
  return 0
end
if state == 'delivered' or state == 'failed' or state == 'cancelled' then return 0 end
if not state then
  redis.call('HSET', KEYS[1], 'req', ARGV[5], 'gen', 1, 'attempt', 0, 'created', ARGV[3])
  if ARGV[14] ~= 'default' then redis.call('HSET', KEYS[1], 'partner', ARGV[14]) end
end
shift(KEYS[6], state, 'failed')
if state then waiting(KEYS[1], -1) end
redis.call('HSET', KEYS[1], 'state', 'failed', 'reason', ARGV[6], 'status', ARGV[8],
           'cid', ARGV[10], 'updated', ARGV[3], 'lease', 0)
redis.call('HDEL', KEYS[1], 'next', 'owner')
redis.call('PERSIST', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
local k = attempt_count(KEYS[1])
if ARGV[4] ~= '' then k = add_attempt(KEYS[1], ARGV[4], ARGV[13]) end
local r = redis.call('HMGET', KEYS[1], 'attempt', 'first', 'last', 'replays', 'created')
local replaced = redis.call('HGET', KEYS[3], 'reason')
if replaced then redis.call('HINCRBY', KEYS[6], 'dead:' .. replaced, -1) end
redis.call('DEL', KEYS[3])
redis.call('HSET', KEYS[3], 'id', ARGV[1], 'req', request_json(KEYS[1]) or ARGV[5],
           'reason', ARGV[6], 'detail', ARGV[7],
           'status', ARGV[8], 'errors', ARGV[9], 'cid', ARGV[10], 'task', ARGV[11],
           'worker', ARGV[12], 'attempts', r[1] or 0, 'first', r[2] or '', 'last', r[3] or '',
           'replays', r[4] or 0, 'created', r[5] or ARGV[3], 'dead', ARGV[3])
redis.call('ZADD', KEYS[4], ARGV[3], ARGV[1])
redis.call('HINCRBY', KEYS[5], 'dead:' .. ARGV[6], 1)
by_partner(KEYS[1], 'dead:' .. ARGV[6])
redis.call('HINCRBY', KEYS[6], 'dead:' .. ARGV[6], 1)
if ARGV[15] == '1' then
  local at = ARGV[4]
  local rest = ARGV[13]
  if at == '' then at = ARGV[3]; rest = false end
  outbox(KEYS[7], KEYS[1], ARGV[1], k, at, rest, true)
end
webhook_event(KEYS[1], ARGV[1], ARGV[16], 'failed', ARGV[6], ARGV[8], ARGV[9], r[1] or 0, ARGV[3])
return 1
