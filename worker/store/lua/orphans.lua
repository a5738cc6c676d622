-- The messages a dead worker took off the queue and left no trace of (kombu's window: its BRPOP
-- popped a task and the process died before the MULTI that notes the task as unacknowledged
-- and its messages as held), put at the head of the schedule so the mover publishes them again.
-- Such a message is waiting (queued, or a retry due), published before the oldest task still on
-- the queue (the queue has moved past it), and held by no live worker. A takeover opens the
-- audit; it is run until the queue has moved past the takeover, each run looking only at what
-- was published since the previous run's cutoff. A live worker's own task caught between its
-- pop and its MULTI is published again too: the extra copy is refused by claim.
-- KEYS: audit, schedule, workers
-- ARGV: cutoff ms (the queue has moved past what was published then), now ms, publish grace ms,
--       dispatch grace ms, record key prefix, held key prefix, live since ms
local a = redis.call('HMGET', KEYS[1], 'from', 'until')
if not a[2] then return -1 end
local cutoff, now = tonumber(ARGV[1]), tonumber(ARGV[2])
local from = tonumber(a[1] or 0)
local found = 0
if cutoff > from then
  -- A published message is scheduled a grace period after it was published: the dispatch grace
  -- when the dispatcher published it (flagged 'dq'), the publish grace otherwise.
  local pg, dg = tonumber(ARGV[3]), tonumber(ARGV[4])
  local live = redis.call('ZRANGEBYSCORE', KEYS[3], ARGV[7], '+inf')
  local ids = redis.call('ZRANGEBYSCORE', KEYS[2], '(' .. (from + math.min(pg, dg)),
    cutoff + math.max(pg, dg), 'WITHSCORES')
  for i = 1, #ids, 2 do
    local id, score = ids[i], tonumber(ids[i + 1])
    if score > now then
      local r = redis.call('HMGET', ARGV[5] .. id, 'state', 'next', 'dq', 'exp')
      local waiting = r[1] == 'queued' or (r[1] == 'retrying' and tonumber(r[2] or 0) <= now)
      -- A message in its lane is on the schedule only for its deadline: not published.
      if waiting and not (r[4] and tonumber(r[4]) == score) then
        local published = score - (r[3] and dg or pg)
        if published > from and published <= cutoff then
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
  redis.call('HSET', KEYS[1], 'from', cutoff)
end
if cutoff >= tonumber(a[2]) then redis.call('DEL', KEYS[1]) end
return found
