-- A record's request as JSON: kept as it came ('req': a request of another shape) or compactly
-- in the fields u, s, t, url (userId, sessionId, templateId, context.url), partner and company,
-- so that every value stays under Redis's 64-byte listpack limit and the hash stays compact.
local function request_json(record)
  local r = redis.call('HMGET', record, 'req', 'u', 's', 't', 'url', 'partner', 'company')
  if r[1] then return r[1] end
  if not r[2] then return false end
  local out = '{"userId":' .. cjson.encode(r[2]) .. ',"sessionId":' .. cjson.encode(r[3] or '')
    .. ',"templateId":' .. cjson.encode(r[4] or '') .. ',"context":'
  if r[5] then out = out .. '{"url":' .. cjson.encode(r[5]) .. '}' else out = out .. '{}' end
  if r[6] then out = out .. ',"partner":' .. cjson.encode(r[6]) end
  if r[7] then out = out .. ',"company":' .. cjson.encode(r[7]) end
  return out .. '}'
end
-- Field/value pairs from ARGV[first], ARGV[first + 1], ... onto a record.
local function set_pairs(record, first)
  for i = first, #ARGV - 1, 2 do redis.call('HSET', record, ARGV[i], ARGV[i + 1]) end
end
