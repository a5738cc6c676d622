local function shift(live, from, to)
  if from == to then return end
  if from == 'inflight' or from == 'retrying' then redis.call('HINCRBY', live, from, -1) end
  if to == 'inflight' or to == 'retrying' then redis.call('HINCRBY', live, to, 1) end
end
-- The same cumulative counter, by the message's partner (records without one: 'default').
local function by_partner(record, name)
  local partner = redis.call('HGET', record, 'partner') or 'default'
  redis.call('HINCRBY', '@PARTNER_STATS@' .. partner, name, 1)
end
-- A record made from a request alone (a replayed letter whose record is gone) takes the
-- request's partner and company, if it names them.
local function adopt_partner(record, req)
  local ok, parsed = pcall(cjson.decode, req)
  local name = ok and type(parsed) == 'table' and parsed['partner']
  if type(name) == 'string' and #name <= 64 and string.match(name, '^[a-z0-9][a-z0-9_.-]*$') then
    redis.call('HSET', record, 'partner', name)
  end
  local company = ok and type(parsed) == 'table' and parsed['company']
  if type(company) == 'string' and #company == 36 and string.match(company, '^[0-9a-f-]+$') then
    redis.call('HSET', record, 'company', company)
  end
end
-- Messages not finished yet, by company (records without one: 'default'), in a sorted set, so
-- `notify stats` reads the companies with the most waiting in one call. +1 when a message
-- starts (created, replayed), -1 when it ends (delivered, dead-lettered); a company at 0 leaves
-- the set, and records from before this gauge (never counted) cannot drive it below 0.
local function waiting(record, delta)
  local company = redis.call('HGET', record, 'company') or 'default'
  local left = tonumber(redis.call('ZINCRBY', '@COMPANY_WAITING@', delta, company))
  if left <= 0 then redis.call('ZREM', '@COMPANY_WAITING@', company) end
end
-- Attempts live in the record itself: field 'a<k>' is the k-th (from 1), as
-- '<at - created>|<number>|<outcome>|<status>|<cause>|<ms>|<cid>' (``AttemptRecord.compact``).
local function attempt_count(record)
  local k = 0
  while redis.call('HEXISTS', record, 'a' .. (k + 1)) == 1 do k = k + 1 end
  return k
end
local function add_attempt(record, at, rest)
  local k = attempt_count(record) + 1
  local created = tonumber(redis.call('HGET', record, 'created')) or 0
  redis.call('HSET', record, 'a' .. k, string.format('%d', tonumber(at) - created) .. rest)
  return k
end
-- The history outbox (``keys.HISTORY_OUTBOX``): one entry per attempt and outcome, written in
-- the same atomic step as the record, drained into PostgreSQL by worker/store/history.py.
-- (id, k, at) is the entry's unique key there. The entry is one field, 'j', a JSON object of
-- the names below: the writer's Redis client parses one value per entry instead of twenty-odd
-- (the largest part of the writer's CPU in the profile, docs/performance.md).
local function outbox(stream, record, id, k, at, rest, final)
  local f = {id = id, k = string.format('%d', tonumber(k) or 0), at = at}
  if rest then f['e'] = rest end
  if not final then  -- an attempt alone: the message's partner and template, for their indexes
    local pt = redis.call('HMGET', record, 'partner', 't')
    if pt[1] then f['p'] = pt[1] end
    if pt[2] then
      f['t'] = pt[2]
    else
      f['rq'] = request_json(record) or ''
    end
  end
  if final then
    local r = redis.call('HMGET', record, 'state', 'reason', 'status', 'cid', 'attempt', 'replays',
                         'created', 'updated')
    if not r[8] then  -- a delivered record keeps it as 'du'
      local du = tonumber(redis.call('HGET', record, 'du')) or 0
      r[8] = string.format('%d', (tonumber(r[7]) or 0) + du)
    end
    local names = {'st', 'rs', 'hs', 'ci', 'na', 'rp', 'cr', 'up'}
    for i, name in ipairs(names) do f[name] = r[i] or '' end
    f['rq'] = request_json(record) or ''
  end
  redis.call('XADD', stream, '*', 'j', cjson.encode(f))
end
