-- KEYS: record, attempts, dead letter, dead index, live ; ARGV: id
local reason = redis.call('HGET', KEYS[3], 'reason')
local removed = redis.call('ZREM', KEYS[4], ARGV[1])
if reason then redis.call('HINCRBY', KEYS[5], 'dead:' .. reason, -1) end
local state = redis.call('HGET', KEYS[1], 'state')
shift(KEYS[5], state, false)
if state and state ~= 'failed' and state ~= 'delivered' then waiting(KEYS[1], -1) end
redis.call('DEL', KEYS[3], KEYS[1], KEYS[2])
if reason or removed == 1 then return 1 end
return 0
