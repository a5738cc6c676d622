-- KEYS: event, webhook schedule, webhook dead index, stats
-- ARGV: id, owner, outcome (sent | retry | defer | dead), now ms, due ms, counted ('1': an
--       attempt was made), status, detail, reason
-- The outcome of one attempt, fenced by the claim's owner.
local r = redis.call('HMGET', KEYS[1], 'state', 'owner')
if r[1] ~= 'sending' or r[2] ~= ARGV[2] then return 0 end
local outcome = ARGV[3]
if outcome == 'sent' then
  redis.call('DEL', KEYS[1])
  redis.call('ZREM', KEYS[2], ARGV[1])
  redis.call('HINCRBY', KEYS[4], 'webhook_sent', 1)
  return 1
end
if ARGV[6] == '1' then redis.call('HINCRBY', KEYS[1], 'n', 1) end
redis.call('HDEL', KEYS[1], 'owner', 'lease')
if ARGV[6] == '1' or outcome == 'dead' then
  redis.call('HSET', KEYS[1], 'last', ARGV[4], 'hstatus', ARGV[7], 'detail', ARGV[8])
end
if outcome == 'dead' then
  redis.call('HSET', KEYS[1], 'state', 'dead', 'dead', ARGV[4], 'why', ARGV[9])
  redis.call('HDEL', KEYS[1], 'next')
  redis.call('ZREM', KEYS[2], ARGV[1])
  redis.call('ZADD', KEYS[3], ARGV[4], ARGV[1])
  redis.call('HINCRBY', KEYS[4], 'webhook_dead:' .. ARGV[9], 1)
  return 1
end
redis.call('HSET', KEYS[1], 'state', 'pending', 'next', ARGV[5])
redis.call('ZADD', KEYS[2], ARGV[5], ARGV[1])
if outcome == 'retry' then redis.call('HINCRBY', KEYS[4], 'webhook_retried', 1) end
return 1
