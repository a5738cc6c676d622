-- A partner's outcome webhook (worker/store/webhooks.py): when a message ends, in the same script
-- that records its end, an event for the partner's endpoint is recorded and scheduled, if the
-- partner has a webhook and chose that event type. So no crash between the two can lose it.
-- kind: 'failed' or 'delivered'; a dead letter whose reason is 'expired' is 'message.expired'.
local function webhook_event(record, id, eid, kind, reason, status, errors, attempts, now)
  if eid == nil or eid == '' then return end
  local partner = redis.call('HGET', record, 'partner') or 'default'
  local events = redis.call('HGET', '@WEBHOOK@' .. partner, 'events')
  if not events then return end
  local name = 'message.' .. kind
  if kind == 'failed' and reason == 'expired' then name = 'message.expired' end
  if not string.find(',' .. events .. ',', ',' .. name .. ',', 1, true) then return end
  local key = '@WEBHOOK_EVENT@' .. eid
  redis.call('HSET', key, 'type', name, 'msg', id, 'partner', partner,
             'company', redis.call('HGET', record, 'company') or 'default', 'at', now,
             'state', 'pending', 'n', 0)
  if kind == 'failed' then
    redis.call('HSET', key, 'reason', reason, 'status', status, 'errors', errors,
               'attempts', attempts)
  end
  redis.call('ZADD', '@WEBHOOK_SCHEDULE@', now, eid)
end
