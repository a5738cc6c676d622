-- The messages a dead worker took off the queue and left no trace of (kombu's window: its BRPOP
-- popped a task and the process died before the MULTI that notes the task as unacknowledged
-- and its messages as held), put at the head of the schedule so the mover publishes them again.
-- Such a message is waiting (queued, or a retry due), published before the oldest task still on
-- the queue (the queue has moved past it), and held by no live worker. A takeover opens the
-- audit; it is run until the queue has moved past the takeover, each pass looking only at what
-- was published since the previous pass's cutoff, a chunk of the schedule a call (Redis does
-- nothing else while a script runs). A live worker's own task caught between its pop and its
-- MULTI is published again too: the extra copy is refused by claim.
-- KEYS: audit, schedule, workers
-- ARGV: cutoff ms (the queue has moved past what was published then), now ms, publish grace ms,
--       dispatch grace ms, record key prefix, held key prefix, live since ms, chunk
-- Returns {found, 1 if the pass goes on}, or {-1, 0} with no audit open.
local a = redis.call('HMGET', KEYS[1], 'from', 'until', 'to', 'at')
if not a[2] then return {-1, 0} end
local now = tonumber(ARGV[2])
local from = tonumber(a[1] or 0)
-- A published message is scheduled a grace period after it was published: the dispatch grace
-- when the dispatcher published it (flagged 'dq'), the publish grace otherwise.
local pg, dg = tonumber(ARGV[3]), tonumber(ARGV[4])
local to, at = tonumber(a[3] or ''), a[4]
if not to then
  -- A new pass: what was published after the previous pass's cutoff, up to this one.
  to = tonumber(ARGV[1])
  if to <= from then return {0, 0} end
  at = '(' .. string.format('%d', from + math.min(pg, dg))
  redis.call('HSET', KEYS[1], 'to', to, 'at', at)
end
local chunk = tonumber(ARGV[8])
local live = redis.call('ZRANGEBYSCORE', KEYS[3], ARGV[7], '+inf')
local found = 0
local function look(ids)
  for i = 1, #ids, 2 do
    local id, score = ids[i], tonumber(ids[i + 1])
    if score > now then
      local r = redis.call('HMGET', ARGV[5] .. id, 'state', 'next', 'dq', 'exp')
      local waiting = r[1] == 'queued' or (r[1] == 'retrying' and tonumber(r[2] or 0) <= now)
      -- A message in its lane is on the schedule only for its deadline: not published.
      if waiting and not (r[4] and tonumber(r[4]) == score) then
        local published = score - (r[3] and dg or pg)
        if published > from and published <= to then
          local held = false
          for _, worker in ipairs(live) do
            if redis.call('SISMEMBER', ARGV[6] .. worker, id) == 1 then
              held = true
              break
            end
          end
          if not held then
            redis.call('ZADD', KEYS[2], now, id)
            found = found + 1
          end
        end
      end
    end
  end
end
local ids = redis.call('ZRANGEBYSCORE', KEYS[2], at, to + math.max(pg, dg), 'WITHSCORES',
  'LIMIT', 0, chunk)
look(ids)
if #ids < 2 * chunk then
  -- The pass is over: what was published until its cutoff has been looked at.
  redis.call('HSET', KEYS[1], 'from', to)
  redis.call('HDEL', KEYS[1], 'to', 'at')
  if to >= tonumber(a[2]) then redis.call('DEL', KEYS[1]) end
  return {found, 0}
end
-- The rest of the last score's messages too (a batch created together shares one score, and
-- may be larger than a chunk), then on from after it.
local last = ids[#ids]
look(redis.call('ZRANGEBYSCORE', KEYS[2], last, last, 'WITHSCORES'))
redis.call('HSET', KEYS[1], 'at', '(' .. last)
return {found, 1}
