-- KEYS: schedule ; ARGV: now ms, limit, grace ms, record key prefix
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
local out = {}
local regrace = tonumber(ARGV[1]) + tonumber(ARGV[3])
for _, id in ipairs(ids) do
  local r = redis.call('HMGET', ARGV[4] .. id, 'state', 'gen')
  if (not r[1]) or r[1] == 'delivered' or r[1] == 'failed' or r[1] == 'cancelled' then
    redis.call('ZREM', KEYS[1], id)
  else
    -- Not removed: it stays scheduled (a grace period ahead) until a worker claims it, so a
    -- crash between this script and the publish below cannot lose it.
    redis.call('ZADD', KEYS[1], regrace, id)
    table.insert(out, id)
    table.insert(out, r[2])
    table.insert(out, request_json(ARGV[4] .. id) or '{}')
  end
end
return out
