-- KEYS: event, webhook schedule ; ARGV: id, owner, now ms, lease ms
-- Take an event for one attempt: pending and due, or being sent under a lease that ran out (its
-- worker died). Returns the event's fields, or nothing.
local now = tonumber(ARGV[3])
local r = redis.call('HMGET', KEYS[1], 'state', 'lease', 'next')
local take = (r[1] == 'pending' and tonumber(r[3] or 0) <= now)
  or (r[1] == 'sending' and tonumber(r[2] or 0) <= now)
if not take then return false end
local lease = now + tonumber(ARGV[4])
redis.call('HSET', KEYS[1], 'state', 'sending', 'owner', ARGV[2], 'lease', lease)
redis.call('ZADD', KEYS[2], lease, ARGV[1])
return redis.call('HGETALL', KEYS[1])
