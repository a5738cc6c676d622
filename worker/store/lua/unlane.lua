-- A company's lanes onto the schedule, due now (its messages go through the workers, which
-- decide their fate: a disconnected company's become dead letters), up to a limit per call.
-- KEYS: ring of companies, company's partner ring, schedule, live
-- ARGV: company, now ms, limit, lane key prefix
local moved = 0
local limit = tonumber(ARGV[3])
while moved < limit do
  local partner = redis.call('LINDEX', KEYS[2], 0)
  if not partner then
    redis.call('LREM', KEYS[1], 0, ARGV[1])
    break
  end
  local lane = ARGV[4] .. ARGV[1] .. ':' .. partner
  local ids = redis.call('LPOP', lane, limit - moved) or {}
  for _, id in ipairs(ids) do redis.call('ZADD', KEYS[3], ARGV[2], id) end
  moved = moved + #ids
  if redis.call('LLEN', lane) == 0 then redis.call('LPOP', KEYS[2]) end
end
if moved > 0 then redis.call('HINCRBY', KEYS[4], 'laned', -moved) end
return moved
