-- Round-robin over companies, then over each company's partner lanes (a deficit round-robin in
-- which every message costs 1): the company at the head of the ring gives up to a quantum of
-- messages, one from each of its partners in turn, then goes to the back. Each message taken
-- goes on the schedule a grace period ahead and is flagged 'dq' (dispatched, not yet claimed;
-- claim clears the flag and the counter), exactly as due.lua hands messages to the mover.
-- KEYS: ring of companies, dispatched counter, schedule, live, workers, turn
-- ARGV: now ms, limit, grace ms, record key prefix, lane key prefix, company ring prefix,
--       company hash prefix, depth per live worker, live since ms, quantum, max skips,
--       default company, its geolocation, task size, paused geolocations...
local now = tonumber(ARGV[1])
local workers = math.max(1, redis.call('ZCOUNT', KEYS[5], ARGV[9], '+inf'))
local depth = tonumber(ARGV[8]) * workers
local room = depth - tonumber(redis.call('GET', KEYS[2]) or 0)
-- Whole tasks only (unless the depth is less than one): a thread holds a task until its
-- slowest post is answered, so a task of 7 would keep a thread as long as a task of 20 does.
local unit = tonumber(ARGV[14])
if depth >= unit and room > 0 then room = room - room % unit end
local limit = math.min(tonumber(ARGV[2]), room)
local out = {}
if limit <= 0 then return out end
local paused = {}
for i = 15, #ARGV do paused[ARGV[i]] = true end
-- Whether a company's lanes may be dispatched now: it is connected (the default company always
-- is: the settings are its state) and its geolocation is not paused. Read once per call.
-- A paused geolocation is named by its base URL or as its breaker is (host[:port], lower case;
-- 'default' for the default company's own breaker).
local function breaker_name(url)
  return string.lower((string.gsub(string.gsub(url, '^%a[%w+.-]*://', ''), '/.*$', '')))
end
local open = {}
local function may(company)
  local ok = open[company]
  if ok == nil then
    if company == ARGV[12] then
      ok = not (paused['default'] or paused[ARGV[13]])
    else
      local c = redis.call('HMGET', ARGV[7] .. company, 'state', 'geolocation')
      ok = c[1] == 'connected'
      if ok and c[2] and (paused[c[2]] or paused[breaker_name(c[2])]) then ok = false end
    end
    open[company] = ok
  end
  return ok
end
local quantum = tonumber(ARGV[10])
local served = tonumber(redis.call('GET', KEYS[6]) or 0)
local companies = redis.call('LLEN', KEYS[1])
local skipped, skips, taken, dropped = 0, 0, 0, 0
local regrace = now + tonumber(ARGV[3])
while taken < limit and skipped < companies and skips < tonumber(ARGV[11]) do
  local company = redis.call('LINDEX', KEYS[1], 0)
  if not may(company) then
    redis.call('LMOVE', KEYS[1], KEYS[1], 'LEFT', 'RIGHT')
    skipped, skips, served = skipped + 1, skips + 1, 0
  else
    skipped = 0
    local ring = ARGV[6] .. company
    local partner = redis.call('LINDEX', ring, 0)
    if partner then
      local lane = ARGV[5] .. company .. ':' .. partner
      local id = redis.call('LPOP', lane)
      if redis.call('LLEN', lane) == 0 then
        redis.call('LPOP', ring)
      else
        redis.call('LMOVE', ring, ring, 'LEFT', 'RIGHT')
      end
      if id then
        local record = ARGV[4] .. id
        local r = redis.call('HMGET', record, 'state', 'gen')
        if r[1] == 'queued' then
          redis.call('ZADD', KEYS[3], regrace, id)
          redis.call('HSET', record, 'dq', 1)
          out[#out + 1] = id
          out[#out + 1] = r[2]
          out[#out + 1] = request_json(record) or '{}'
          taken = taken + 1
        else
          -- Finished or taken some other way (a hand-made task, a replay): the schedule or
          -- its outcome already has it.
          dropped = dropped + 1
        end
      end
      served = served + 1
    end
    if redis.call('LLEN', ring) == 0 then
      redis.call('LPOP', KEYS[1])
      companies, served = companies - 1, 0
    elseif served >= quantum then
      redis.call('LMOVE', KEYS[1], KEYS[1], 'LEFT', 'RIGHT')
      served = 0
    end
  end
end
if taken + dropped > 0 then redis.call('HINCRBY', KEYS[4], 'laned', -(taken + dropped)) end
if taken > 0 then redis.call('INCRBY', KEYS[2], taken) end
redis.call('SET', KEYS[6], served)
return out
