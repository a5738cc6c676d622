-- KEYS: record, schedule, attempts (a record's list from before attempts were folded in),
--       stats, delivered-this-minute, live, history outbox
-- ARGV: id, now ms, attempt at ms, attempt rest, ttl s, counter ttl s, history ('1' = on),
--       webhook event id ('' = none)
local state = redis.call('HGET', KEYS[1], 'state')
if state == 'delivered' or state == 'failed' then return 0 end
-- A 2xx is the truth even if this worker's lease ran out: record it.
shift(KEYS[6], state, 'delivered')
if state then waiting(KEYS[1], -1) end
-- 'updated' is kept as 'du', milliseconds after 'created' (a small integer, not 13 digits).
local created = tonumber(redis.call('HGET', KEYS[1], 'created')) or 0
redis.call('HSET', KEYS[1], 'state', 'delivered', 'du',
           string.format('%d', tonumber(ARGV[2]) - created))
-- What a delivered message no longer needs goes: its generation (a claim of it is refused by
-- its state), lease, owner, worker, task, next retry, first and last attempt times, and its
-- attempt count, last status and correlation id (its last attempt has them). What stays fits
-- a listpack-encoded hash (docs/scaling.md, "Memory and history").
redis.call('HDEL', KEYS[1], 'gen', 'next', 'owner', 'lease', 'worker', 'task', 'first', 'last',
           'attempt', 'status', 'cid', 'reason', 'updated')
local k = add_attempt(KEYS[1], ARGV[3], ARGV[4])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[5])
redis.call('EXPIRE', KEYS[3], ARGV[5])
redis.call('HINCRBY', KEYS[4], 'delivered', 1)
by_partner(KEYS[1], 'delivered')
redis.call('INCR', KEYS[5])
redis.call('EXPIRE', KEYS[5], ARGV[6])
if ARGV[7] == '1' then outbox(KEYS[7], KEYS[1], ARGV[1], k, ARGV[3], ARGV[4], true) end
webhook_event(KEYS[1], ARGV[1], ARGV[8], 'delivered', '', '', '', k, ARGV[2])
return 1
