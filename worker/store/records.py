"""Message status records in Redis, changed only by atomic Lua scripts.

A message's life (its ``state``)::

    queued ──claim──► inflight ──2xx──► delivered
       ▲                 │ ├──passing failure──► retrying ──(due: the mover republishes)──┐
       │                 │ └──failure for good──► failed (a dead letter)                  │
       └── replay ◄──────┴───────────────────────────────── claim ◄──────────────────────┘

Two rules make "nothing lost, nothing sent twice" hold with an at-least-once broker:

* Fencing: every scheduling of a message bumps its generation ``gen``; a task carries the
  ``gen`` it was published for, and ``claim`` refuses a task whose ``gen`` is not current, a
  message already delivered or failed, or one another worker holds under a live lease. So a
  redelivered or duplicated task never posts twice.
* The schedule (``keys.SCHEDULE``) holds every message that is not finished, scored by when it
  must next be attempted: a retry's due time, a queued message's publish grace, an in-flight
  message's lease end. The mover republishes whatever is overdue. A task lost anywhere (a
  producer crash after create, a worker killed mid-attempt, a broker restart) is therefore
  attempted again; nothing waits in worker memory.

``defer`` puts a claimed message back to ``retrying`` without counting an attempt (the rate
limit had no permit for it); it is fenced like ``retry`` (owner check, new generation).

Operators' gauges (``keys.LIVE``: messages ``inflight`` and ``retrying`` now, dead letters held
now by ``dead:<reason>``) are changed by the same scripts that change a state, in the same
atomic step, so they are exact as long as only these scripts write the records.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from redis import Redis

from worker.queue.envelopes import Envelope
from worker.shapes.models import DEFAULT_PARTNER, is_partner_name, partner_of
from worker.store import keys

DELIVERED_COUNTER_TTL_SECONDS = 2 * 3600
# How long a new record waits for its replicas (``wait_replicas``) before it is accepted anyway.
WAIT_TIMEOUT_MS = 100
_wait_warned = 0.0
log = logging.getLogger("notify.records")

_REQUEST = """
-- A record's request as JSON: kept as it came ('req': a request of another shape) or compactly
-- in the fields u, s, t, url (userId, sessionId, templateId, context.url) and partner, so that
-- every value stays under Redis's 64-byte listpack limit and the hash stays compact.
local function request_json(record)
  local r = redis.call('HMGET', record, 'req', 'u', 's', 't', 'url', 'partner')
  if r[1] then return r[1] end
  if not r[2] then return false end
  local out = '{"userId":' .. cjson.encode(r[2]) .. ',"sessionId":' .. cjson.encode(r[3] or '')
    .. ',"templateId":' .. cjson.encode(r[4] or '') .. ',"context":'
  if r[5] then out = out .. '{"url":' .. cjson.encode(r[5]) .. '}' else out = out .. '{}' end
  if r[6] then out = out .. ',"partner":' .. cjson.encode(r[6]) end
  return out .. '}'
end
-- Field/value pairs from ARGV[first], ARGV[first + 1], ... onto a record.
local function set_pairs(record, first)
  for i = first, #ARGV - 1, 2 do redis.call('HSET', record, ARGV[i], ARGV[i + 1]) end
end
"""

# Prepended to every script that changes a state: keeps the ``keys.LIVE`` gauges in step.
_GAUGES = (
    _REQUEST
    + """
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
-- request's partner, if it names one.
local function adopt_partner(record, req)
  local ok, parsed = pcall(cjson.decode, req)
  local name = ok and type(parsed) == 'table' and parsed['partner']
  if type(name) == 'string' and #name <= 64 and string.match(name, '^[a-z0-9][a-z0-9_.-]*$') then
    redis.call('HSET', record, 'partner', name)
  end
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
-- (id, k, at) is the entry's unique key there.
local function outbox(stream, record, id, k, at, rest, final)
  local f = {'id', id, 'k', k, 'at', at}
  if rest then
    table.insert(f, 'e'); table.insert(f, rest)
  end
  if not final then  -- an attempt alone: the message's partner and template, for their indexes
    local pt = redis.call('HMGET', record, 'partner', 't')
    if pt[1] then table.insert(f, 'p'); table.insert(f, pt[1]) end
    if pt[2] then
      table.insert(f, 't'); table.insert(f, pt[2])
    else
      table.insert(f, 'rq'); table.insert(f, request_json(record) or '')
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
    for i, name in ipairs(names) do
      table.insert(f, name); table.insert(f, r[i] or '')
    end
    table.insert(f, 'rq'); table.insert(f, request_json(record) or '')
  end
  redis.call('XADD', stream, '*', unpack(f))
end
"""
).replace("@PARTNER_STATS@", keys.partner_stats(""))

_CREATE = """
-- KEYS: record, schedule, partners ; ARGV: id, now ms, grace ms, partner, request field pairs...
local state = redis.call('HGET', KEYS[1], 'state')
if state then
  return {0, state, redis.call('HGET', KEYS[1], 'gen')}
end
redis.call('HSET', KEYS[1], 'state', 'queued', 'gen', 1, 'attempt', 0, 'created', ARGV[2],
           'updated', ARGV[2])
set_pairs(KEYS[1], 5)
if ARGV[4] ~= 'default' then redis.call('HSET', KEYS[1], 'partner', ARGV[4]) end
redis.call('SADD', KEYS[3], ARGV[4])
redis.call('ZADD', KEYS[2], tonumber(ARGV[2]) + tonumber(ARGV[3]), ARGV[1])
return {1, 'queued', '1'}
"""

_CLAIM = """
-- KEYS: record, schedule, live
-- ARGV: id, gen, now ms, lease ms, owner, worker, task id, partner, request field pairs...
local now = tonumber(ARGV[3])
local state = redis.call('HGET', KEYS[1], 'state')
if not state then
  -- A task without a record: made by hand, or its record was lost. The task's copy of the
  -- request becomes the record, so it is tracked like any other.
  redis.call('HSET', KEYS[1], 'state', 'queued', 'gen', ARGV[2], 'attempt', 0, 'created', now)
  set_pairs(KEYS[1], 9)
  if ARGV[8] ~= 'default' then redis.call('HSET', KEYS[1], 'partner', ARGV[8]) end
  state = 'queued'
end
if state == 'delivered' or state == 'failed' then return {'done', state} end
if redis.call('HGET', KEYS[1], 'gen') ~= ARGV[2] then return {'stale', state} end
if state == 'inflight' and tonumber(redis.call('HGET', KEYS[1], 'lease') or 0) > now then
  return {'busy', state}
end
local attempt = redis.call('HINCRBY', KEYS[1], 'attempt', 1)
shift(KEYS[3], state, 'inflight')
local lease = now + tonumber(ARGV[4])
redis.call('HSET', KEYS[1], 'state', 'inflight', 'lease', lease, 'owner', ARGV[5],
           'worker', ARGV[6], 'task', ARGV[7], 'updated', now, 'last', now)
redis.call('HSETNX', KEYS[1], 'first', now)
redis.call('ZADD', KEYS[2], lease, ARGV[1])
return {'go', tostring(attempt), request_json(KEYS[1])}
"""

_DELIVERED = """
-- KEYS: record, schedule, attempts (a record's list from before attempts were folded in),
--       stats, delivered-this-minute, live, history outbox
-- ARGV: id, now ms, attempt at ms, attempt rest, ttl s, counter ttl s, history ('1' = on)
local state = redis.call('HGET', KEYS[1], 'state')
if state == 'delivered' or state == 'failed' then return 0 end
-- A 2xx is the truth even if this worker's lease ran out: record it.
shift(KEYS[6], state, 'delivered')
-- 'updated' is kept as 'du', milliseconds after 'created' (a small integer, not 13 digits).
local created = tonumber(redis.call('HGET', KEYS[1], 'created')) or 0
redis.call('HSET', KEYS[1], 'state', 'delivered', 'du',
           string.format('%d', tonumber(ARGV[2]) - created))
-- What a delivered message no longer needs goes: its generation (a claim of it is refused by
-- its state), lease, owner, worker, task, next retry, first and last attempt times, and its
-- attempt count, last status and correlation id (its last attempt has them). What stays fits
-- a listpack-encoded hash (docs/scaling.md, "Memory and history").
redis.call('HDEL', KEYS[1], 'gen', 'next', 'owner', 'lease', 'worker', 'task', 'first', 'last',
           'attempt', 'status', 'cid', 'reason', 'updated')
local k = add_attempt(KEYS[1], ARGV[3], ARGV[4])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[5])
redis.call('EXPIRE', KEYS[3], ARGV[5])
redis.call('HINCRBY', KEYS[4], 'delivered', 1)
by_partner(KEYS[1], 'delivered')
redis.call('INCR', KEYS[5])
redis.call('EXPIRE', KEYS[5], ARGV[6])
if ARGV[7] == '1' then outbox(KEYS[7], KEYS[1], ARGV[1], k, ARGV[3], ARGV[4], true) end
return 1
"""

_RETRY = """
-- KEYS: record, schedule, stats, live, history outbox
-- ARGV: id, owner, now ms, due ms, attempt at ms, attempt rest, status, cid, history
if redis.call('HGET', KEYS[1], 'state') ~= 'inflight'
   or redis.call('HGET', KEYS[1], 'owner') ~= ARGV[2] then
  return 0  -- this worker lost the message (its lease ran out); the new holder decides
end
local gen = redis.call('HINCRBY', KEYS[1], 'gen', 1)
redis.call('HSET', KEYS[1], 'state', 'retrying', 'next', ARGV[4], 'status', ARGV[7],
           'cid', ARGV[8], 'updated', ARGV[3], 'lease', 0)
redis.call('HDEL', KEYS[1], 'owner')
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[1])
local k = add_attempt(KEYS[1], ARGV[5], ARGV[6])
redis.call('HINCRBY', KEYS[3], 'retried', 1)
by_partner(KEYS[1], 'retried')
shift(KEYS[4], 'inflight', 'retrying')
if ARGV[9] == '1' then outbox(KEYS[5], KEYS[1], ARGV[1], k, ARGV[5], ARGV[6], false) end
return gen
"""

_DEAD = """
-- KEYS: record, schedule, dead letter, dead index, stats, live, history outbox
-- ARGV: id, owner ('' = no owner check), now ms, attempt at ms ('' = no attempt),
--       request json (if no record), reason, detail, status, errors json, cid, task, worker,
--       attempt rest, partner of the request, history
local state = redis.call('HGET', KEYS[1], 'state')
if ARGV[2] ~= '' and (state ~= 'inflight' or redis.call('HGET', KEYS[1], 'owner') ~= ARGV[2]) then
  return 0
end
if state == 'delivered' or state == 'failed' then return 0 end
if not state then
  redis.call('HSET', KEYS[1], 'req', ARGV[5], 'gen', 1, 'attempt', 0, 'created', ARGV[3])
  if ARGV[14] ~= 'default' then redis.call('HSET', KEYS[1], 'partner', ARGV[14]) end
end
shift(KEYS[6], state, 'failed')
redis.call('HSET', KEYS[1], 'state', 'failed', 'reason', ARGV[6], 'status', ARGV[8],
           'cid', ARGV[10], 'updated', ARGV[3], 'lease', 0)
redis.call('HDEL', KEYS[1], 'next', 'owner')
redis.call('PERSIST', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
local k = attempt_count(KEYS[1])
if ARGV[4] ~= '' then k = add_attempt(KEYS[1], ARGV[4], ARGV[13]) end
local r = redis.call('HMGET', KEYS[1], 'attempt', 'first', 'last', 'replays', 'created')
local replaced = redis.call('HGET', KEYS[3], 'reason')
if replaced then redis.call('HINCRBY', KEYS[6], 'dead:' .. replaced, -1) end
redis.call('DEL', KEYS[3])
redis.call('HSET', KEYS[3], 'id', ARGV[1], 'req', request_json(KEYS[1]) or ARGV[5],
           'reason', ARGV[6], 'detail', ARGV[7],
           'status', ARGV[8], 'errors', ARGV[9], 'cid', ARGV[10], 'task', ARGV[11],
           'worker', ARGV[12], 'attempts', r[1] or 0, 'first', r[2] or '', 'last', r[3] or '',
           'replays', r[4] or 0, 'created', r[5] or ARGV[3], 'dead', ARGV[3])
redis.call('ZADD', KEYS[4], ARGV[3], ARGV[1])
redis.call('HINCRBY', KEYS[5], 'dead:' .. ARGV[6], 1)
by_partner(KEYS[1], 'dead:' .. ARGV[6])
redis.call('HINCRBY', KEYS[6], 'dead:' .. ARGV[6], 1)
if ARGV[15] == '1' then
  local at = ARGV[4]
  local rest = ARGV[13]
  if at == '' then at = ARGV[3]; rest = false end
  outbox(KEYS[7], KEYS[1], ARGV[1], k, at, rest, true)
end
return 1
"""

_REPLAY = """
-- KEYS: record, schedule, dead letter, dead index, stats, live ; ARGV: id, now ms, grace ms
local req = redis.call('HGET', KEYS[3], 'req')
if not req then return false end
local reason = redis.call('HGET', KEYS[3], 'reason')
if reason then redis.call('HINCRBY', KEYS[6], 'dead:' .. reason, -1) end
shift(KEYS[6], redis.call('HGET', KEYS[1], 'state'), 'queued')
local replays = tonumber(redis.call('HGET', KEYS[3], 'replays') or 0) + 1
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('HSET', KEYS[1], 'req', req, 'gen', 0, 'created', ARGV[2])
  adopt_partner(KEYS[1], req)
end
local gen = redis.call('HINCRBY', KEYS[1], 'gen', 1)
redis.call('HSET', KEYS[1], 'state', 'queued', 'attempt', 0, 'replays', replays, 'lease', 0,
           'updated', ARGV[2])
redis.call('HDEL', KEYS[1], 'next', 'owner', 'reason', 'first', 'last')
redis.call('PERSIST', KEYS[1])
redis.call('ZADD', KEYS[2], tonumber(ARGV[2]) + tonumber(ARGV[3]), ARGV[1])
redis.call('DEL', KEYS[3])
redis.call('ZREM', KEYS[4], ARGV[1])
redis.call('HINCRBY', KEYS[5], 'replayed', 1)
by_partner(KEYS[1], 'replayed')
return {tostring(gen), req}
"""

_DEFER = """
-- KEYS: record, schedule, stats, live, history outbox
-- ARGV: id, owner, now ms, due ms, attempt at ms ('' = none), attempt rest, history
if redis.call('HGET', KEYS[1], 'state') ~= 'inflight'
   or redis.call('HGET', KEYS[1], 'owner') ~= ARGV[2] then
  return 0  -- this worker lost the message (its lease ran out); the new holder decides
end
if ARGV[5] ~= '' then
  local k = add_attempt(KEYS[1], ARGV[5], ARGV[6])
  if ARGV[7] == '1' then outbox(KEYS[5], KEYS[1], ARGV[1], k, ARGV[5], ARGV[6], false) end
end
local gen = redis.call('HINCRBY', KEYS[1], 'gen', 1)
-- Nothing was posted: give back the attempt the claim counted.
if redis.call('HINCRBY', KEYS[1], 'attempt', -1) <= 0 then
  redis.call('HSET', KEYS[1], 'attempt', 0)
  redis.call('HDEL', KEYS[1], 'first', 'last')
end
redis.call('HSET', KEYS[1], 'state', 'retrying', 'next', ARGV[4], 'updated', ARGV[3], 'lease', 0)
redis.call('HDEL', KEYS[1], 'owner')
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[1])
redis.call('HINCRBY', KEYS[3], 'deferred', 1)
by_partner(KEYS[1], 'deferred')
shift(KEYS[4], 'inflight', 'retrying')
return gen
"""

_FORGET = """
-- KEYS: record, attempts, dead letter, dead index, live ; ARGV: id
local reason = redis.call('HGET', KEYS[3], 'reason')
local removed = redis.call('ZREM', KEYS[4], ARGV[1])
if reason then redis.call('HINCRBY', KEYS[5], 'dead:' .. reason, -1) end
shift(KEYS[5], redis.call('HGET', KEYS[1], 'state'), false)
redis.call('DEL', KEYS[3], KEYS[1], KEYS[2])
if reason or removed == 1 then return 1 end
return 0
"""

_DUE = (
    _REQUEST
    + """
-- KEYS: schedule ; ARGV: now ms, limit, grace ms, record key prefix
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
local out = {}
local regrace = tonumber(ARGV[1]) + tonumber(ARGV[3])
for _, id in ipairs(ids) do
  local r = redis.call('HMGET', ARGV[4] .. id, 'state', 'gen')
  if (not r[1]) or r[1] == 'delivered' or r[1] == 'failed' then
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
"""
)


def now_ms() -> int:
    """Wall-clock milliseconds, the unit of every time stored in Redis."""
    return int(time.time() * 1000)


@dataclass(frozen=True, slots=True)
class Claim:
    """The answer of ``claim``: ``go`` (attempt number and stored request) or why not."""

    verdict: str  # go | done | stale | busy
    attempt: int = 0
    request: dict[str, Any] | None = None
    state: str = ""


@dataclass(frozen=True, slots=True)
class AttemptRecord:
    """One attempt, as the status API shows it."""

    number: int
    at_ms: int
    outcome: str
    status: int | None
    cause: str
    duration_ms: int
    correlation_id: str | None

    def to_json(self) -> str:
        """The stored form."""
        return json.dumps(
            {
                "n": self.number,
                "at": self.at_ms,
                "outcome": self.outcome,
                "status": self.status,
                "cause": self.cause,
                "ms": self.duration_ms,
                "cid": self.correlation_id,
            },
            separators=(",", ":"),
        )

    def compact(self) -> str:
        """The stored form after its time: ``|number|outcome|status|cause|ms|cid``.

        The outcome is one letter for the usual ones, the cause is left out when it is just
        ``http_<status>``; the correlation id comes last, so it may hold any character.
        """
        cause = "" if self.status and self.cause == f"http_{self.status}" else self.cause or ""
        return "|".join(
            (
                "",
                str(self.number),
                _OUTCOME_CODES.get(self.outcome, str(self.outcome).replace("|", "/")),
                "" if self.status is None else str(self.status),
                cause.replace("|", "/"),
                str(self.duration_ms),
                _short_cid(self.correlation_id or ""),
            )
        )


@dataclass(frozen=True, slots=True)
class Failure:
    """Everything a dead letter records about why it failed."""

    reason: str
    detail: str
    status: int | None = None
    errors: list[dict[str, str | None]] | None = None
    correlation_id: str | None = None
    task_id: str = ""
    worker: str = ""


def _back_on_schedule_keys(message_id: str) -> list[str]:
    # KEYS of the two scripts that put a claimed message back on the schedule (_RETRY, _DEFER).
    return [keys.message(message_id), keys.SCHEDULE, keys.STATS, keys.LIVE, keys.HISTORY_OUTBOX]


def _dead_letter_keys(message_id: str) -> list[str]:
    # The KEYS a dead letter's scripts share (_DEAD, which adds the history outbox; _REPLAY).
    return [
        keys.message(message_id),
        keys.SCHEDULE,
        keys.dead_letter(message_id),
        keys.DEAD_INDEX,
        keys.STATS,
        keys.LIVE,
    ]


def _back_on_schedule_args(message_id: str, owner: str, due_ms: int) -> list[Any]:
    # The first ARGV of both: whose claim it must be, now, and when it is due again.
    return [message_id, owner, now_ms(), due_ms]


class MessageStore:
    """The status records and the schedule; every change is one atomic script."""

    def __init__(
        self,
        redis: Redis,
        *,
        publish_grace_seconds: float,
        lease_seconds: float,
        status_ttl_seconds: int,
        wait_replicas: int = 0,
        history: bool = False,
    ) -> None:
        self.redis = redis
        # Every attempt and outcome also goes to the history outbox (``NOTIFY_HISTORY_URL``).
        self.history = history
        # New records wait (Redis WAIT) until this many replicas hold them: a failover then
        # cannot lose a message that was answered "queued" (docs/scaling.md).
        self.wait_replicas = wait_replicas
        self._replicas_connected = 0
        self._replicas_checked = -1e9
        self.publish_grace_ms = int(publish_grace_seconds * 1000)
        self.lease_ms = int(lease_seconds * 1000)
        self.status_ttl_seconds = status_ttl_seconds
        self._create = redis.register_script(_REQUEST + _CREATE)
        self._claim = redis.register_script(_GAUGES + _CLAIM)
        self._delivered = redis.register_script(_GAUGES + _DELIVERED)
        self._retry = redis.register_script(_GAUGES + _RETRY)
        self._dead = redis.register_script(_GAUGES + _DEAD)
        self._replay = redis.register_script(_GAUGES + _REPLAY)
        self._due = redis.register_script(_DUE)
        self._defer = redis.register_script(_GAUGES + _DEFER)
        self._forget = redis.register_script(_GAUGES + _FORGET)
        self._local = threading.local()

    def _run(self, script: Any, *, keys: list[str], args: list[Any]) -> Any:
        """Run ``script`` (a redis-py ``Script``) on this thread's Redis client.

        redis-py does the rest: a script Redis forgot (a restart, SCRIPT FLUSH, a failover) is
        loaded again and run once more, and a connection Redis dropped is replaced and the call
        made again on a new one, for as long as the client's patience lasts
        (worker.store.redisclient).
        That matters most for outcomes: one not written leaves its message in flight until its
        lease ends, and then it is attempted again (after a 2xx, a second post). Every script is
        safe to repeat: each checks the state (and the owner) first, so a write that landed but
        whose reply was lost changes nothing again.
        """
        return script(keys=keys, args=args, client=self._conn())

    def _conn(self) -> Redis:
        # One connection per thread for the per-message scripts: with dozens of threads on one
        # pool, taking and returning a pooled connection cost a worker more CPU than the
        # scripts themselves (measured with py-spy). Same pool, same settings.
        client: Redis | None = getattr(self._local, "client", None)
        if client is None:
            client = Redis(
                connection_pool=self.redis.connection_pool, single_connection_client=True
            )
            self._local.client = client
        return client

    def create(self, message_id: str, request: Mapping[str, Any]) -> tuple[bool, str]:
        """Record a new message as queued; ``(False, state)`` when it exists already."""
        created, state, _gen = self._run(
            self._create,
            keys=[keys.message(message_id), keys.SCHEDULE, keys.PARTNERS],
            args=[
                message_id,
                now_ms(),
                self.publish_grace_ms,
                partner_of(request),
                *request_fields(request),
            ],
        )
        if self._replicas_to_wait():
            self._replicated(self._conn().wait(*self._wait_args()))
        return bool(int(created)), str(state)

    def _replicas_to_wait(self) -> int:
        # WAIT for replicas that are connected (asked at most once a second): with none (the
        # old master not yet back after a failover), there is nothing a failover could lose
        # these writes to, and every acceptance would pay the whole timeout.
        if not self.wait_replicas:
            return 0
        if time.monotonic() - self._replicas_checked > 1.0:
            info = self.redis.info("replication")
            self._replicas_connected = int(info.get("connected_slaves", 0))
            self._replicas_checked = time.monotonic()
        return min(self.wait_replicas, self._replicas_connected)

    def _wait_args(self) -> tuple[int, int]:
        return self._replicas_to_wait(), WAIT_TIMEOUT_MS

    def _replicated(self, acknowledged: Any) -> None:
        global _wait_warned
        wanted = self._replicas_to_wait()
        if int(acknowledged) < wanted and time.monotonic() - _wait_warned > 60:
            _wait_warned = time.monotonic()
            log.warning(
                "new records reached %s of %d replicas within %d ms; a failover now could "
                "lose them",
                acknowledged,
                wanted,
                WAIT_TIMEOUT_MS,
            )

    def create_many(self, items: list[tuple[str, Mapping[str, Any]]]) -> list[tuple[bool, str]]:
        """``create`` for many messages in one round trip."""
        if len(items) == 1:  # the single call is the cheaper round trip
            return [self.create(*items[0])]
        now = now_ms()
        pipe = self.redis.pipeline(transaction=False)
        for message_id, request in items:
            self._create(
                keys=[keys.message(message_id), keys.SCHEDULE, keys.PARTNERS],
                args=[
                    message_id,
                    now,
                    self.publish_grace_ms,
                    partner_of(request),
                    *request_fields(request),
                ],
                client=pipe,
            )
        waiting = self._replicas_to_wait()
        if waiting:  # same connection, so it waits for these writes
            pipe.wait(*self._wait_args())
        replies = pipe.execute()
        if waiting:
            self._replicated(replies.pop())
        return [(bool(int(created)), str(state)) for created, state, _ in replies]

    def claim(self, envelope: Envelope, *, owner: str, worker: str, task_id: str) -> Claim:
        """Take the message for one attempt, or say why this task must not attempt it."""
        [claim] = self.claim_many([(envelope, owner)], worker=worker, task_id=task_id)
        return claim

    def claim_many(
        self, items: list[tuple[Envelope, str]], *, worker: str, task_id: str
    ) -> list[Claim]:
        """``claim`` for each ``(envelope, owner)`` of a task, in one round trip.

        Each message is still claimed by its own script, under its own owner and lease; only the
        round trips are shared (a task's 20 claims one by one kept a thread waiting on Redis
        longer than on the API's answers, measured with py-spy).
        """
        now = now_ms()
        calls: list[tuple[list[str], list[Any]]] = [
            (
                [keys.message(envelope.id), keys.SCHEDULE, keys.LIVE],
                [
                    envelope.id,
                    envelope.gen,
                    now,
                    self.lease_ms,
                    owner,
                    worker,
                    task_id,
                    partner_of(envelope.request),
                    *request_fields(envelope.request),
                ],
            )
            for envelope, owner in items
        ]
        if len(calls) == 1:  # one script call is cheaper than a pipeline (no SCRIPT EXISTS)
            [(call_keys, call_args)] = calls
            return [_claim_from(self._run(self._claim, keys=call_keys, args=call_args))]
        pipe = self.redis.pipeline(transaction=False)
        for call_keys, call_args in calls:
            self._claim(keys=call_keys, args=call_args, client=pipe)
        return [_claim_from(reply) for reply in pipe.execute()]

    def delivered(self, message_id: str, attempt: AttemptRecord) -> bool:
        """Record a 2xx; False when the message had already finished."""
        minute = attempt.at_ms // 60000
        return bool(
            self._run(
                self._delivered,
                keys=[
                    keys.message(message_id),
                    keys.SCHEDULE,
                    keys.attempts(message_id),
                    keys.STATS,
                    f"{keys.DELIVERED_PER_MINUTE}:{minute}",
                    keys.LIVE,
                    keys.HISTORY_OUTBOX,
                ],
                args=[
                    message_id,
                    now_ms(),  # "updated": when the outcome was known, not when the post began
                    attempt.at_ms,
                    attempt.compact(),
                    self.status_ttl_seconds,
                    DELIVERED_COUNTER_TTL_SECONDS,
                    self._history_flag,
                ],
            )
        )

    def retry(self, message_id: str, owner: str, due_ms: int, attempt: AttemptRecord) -> bool:
        """Schedule the next attempt at ``due_ms``; False when this worker no longer holds it."""
        return bool(
            self._run(
                self._retry,
                keys=_back_on_schedule_keys(message_id),
                args=[
                    *_back_on_schedule_args(message_id, owner, due_ms),
                    attempt.at_ms,
                    attempt.compact(),
                    attempt.status or "",
                    attempt.correlation_id or "",
                    self._history_flag,
                ],
            )
        )

    def dead_letter(
        self,
        message_id: str,
        failure: Failure,
        *,
        owner: str = "",
        attempt: AttemptRecord | None = None,
        request: Mapping[str, Any] | str | None = None,
    ) -> bool:
        """Write the dead letter and mark the message failed, atomically.

        ``owner`` empty skips the ownership check (for a task that could not be claimed at all).
        """
        stored_request = request if isinstance(request, str) else _dumps(request or {})
        return bool(
            self._run(
                self._dead,
                keys=[*_dead_letter_keys(message_id), keys.HISTORY_OUTBOX],
                args=[
                    message_id,
                    owner,
                    attempt.at_ms if attempt else now_ms(),
                    attempt.at_ms if attempt else "",
                    stored_request,
                    failure.reason,
                    failure.detail,
                    failure.status or "",
                    _dumps(failure.errors or []),
                    failure.correlation_id or "",
                    failure.task_id,
                    failure.worker,
                    attempt.compact() if attempt else "",
                    partner_of(_loads_object(stored_request)),
                    self._history_flag,
                ],
            )
        )

    def replay(self, message_id: str) -> Envelope | None:
        """Move a dead letter back to queued (new generation); None if there is no such letter."""
        reply = self._replay(
            keys=_dead_letter_keys(message_id),
            args=[message_id, now_ms(), self.publish_grace_ms],
        )
        if not reply:
            return None
        return Envelope(message_id, int(reply[0]), _loads_object(reply[1]))

    def defer(
        self, message_id: str, owner: str, due_ms: int, attempt: AttemptRecord | None = None
    ) -> bool:
        """Put a claimed message back to ``retrying`` at ``due_ms`` without counting an attempt.

        For a message that was never posted (no rate-limit permit, or no token, in time);
        ``attempt``, when given, is added to its history in the same step. False when this
        worker no longer holds it.
        """
        return bool(
            self._run(
                self._defer,
                keys=_back_on_schedule_keys(message_id),
                args=[
                    *_back_on_schedule_args(message_id, owner, due_ms),
                    attempt.at_ms if attempt else "",
                    attempt.compact() if attempt else "",
                    self._history_flag,
                ],
            )
        )

    def forget_dead_letter(self, message_id: str) -> bool:
        """Delete a dead letter with its message's record and history; False if there was none."""
        return bool(
            self._forget(
                keys=[
                    keys.message(message_id),
                    keys.attempts(message_id),
                    keys.dead_letter(message_id),
                    keys.DEAD_INDEX,
                    keys.LIVE,
                ],
                args=[message_id],
            )
        )

    def due(self, limit: int = 500) -> list[Envelope]:
        """Messages whose next attempt is overdue; each is pushed a grace period ahead."""
        flat = self._due(
            keys=[keys.SCHEDULE],
            args=[now_ms(), limit, self.publish_grace_ms, keys.message("")],
        )
        return [
            Envelope(str(flat[i]), int(flat[i + 1]), _loads_object(flat[i + 2]))
            for i in range(0, len(flat), 3)
        ]

    @property
    def _history_flag(self) -> str:
        return "1" if self.history else "0"

    def status(self, message_id: str) -> dict[str, Any] | None:
        """The status record and attempt history of one message, or None.

        The shape every reader knows, whatever the stored form: ``req`` as JSON, ``attempts`` as
        a list of ``AttemptRecord.to_json`` objects, and a delivered message's last HTTP status
        and correlation id (``status``, ``cid``) from its last attempt.
        """
        pipe = self.redis.pipeline(transaction=False)
        pipe.hgetall(keys.message(message_id))
        # Records from before attempts were folded in keep theirs in a list until they expire.
        pipe.lrange(keys.attempts(message_id), 0, -1)
        record, attempts = pipe.execute()
        if not record:
            return None
        return expand_record(record, [json.loads(entry) for entry in attempts])


_OUTCOME_CODES = {"delivered": "d", "retry": "r", "dead": "x", "deferred": "w"}
_OUTCOMES = {code: name for name, code in _OUTCOME_CODES.items()}
_COMPACT_REQUEST = {"u": "userId", "s": "sessionId", "t": "templateId"}
_ATTEMPT_FIELD = re.compile(r"a[0-9]+")


def request_fields(request: Mapping[str, Any]) -> list[str]:
    """A request as record field/value pairs: compact (``u``, ``s``, ``t``, ``url``) when it has
    the usual shape (``Message.to_wire``), else its JSON as ``req``. The partner is apart."""
    context = request.get("context")
    parts = [request.get(name) for name in _COMPACT_REQUEST.values()]
    partner = request.get("partner")
    usual = (
        set(request) <= {*_COMPACT_REQUEST.values(), "context", "partner"}
        and all(isinstance(part, str) for part in parts)
        and isinstance(context, dict)
        and set(context) <= {"url"}
        and isinstance(context.get("url", ""), str)
        and (partner is None or (is_partner_name(partner) and partner != DEFAULT_PARTNER))
    )
    if not usual:
        return ["req", _dumps(dict(request))]
    fields = [item for pair in zip(_COMPACT_REQUEST, parts, strict=True) for item in pair]
    assert isinstance(context, dict)
    if "url" in context:
        fields += ["url", context["url"]]
    return [str(item) for item in fields]


def request_of(record: Mapping[str, Any]) -> dict[str, Any]:
    """The request a stored record holds (see ``request_fields``)."""
    if "req" in record or "u" not in record:
        return _loads_object(record.get("req"))
    request: dict[str, Any] = {
        name: record.get(field, "") for field, name in _COMPACT_REQUEST.items()
    }
    request["context"] = {"url": record["url"]} if "url" in record else {}
    partner = record.get("partner")
    if partner and partner != DEFAULT_PARTNER:
        request["partner"] = partner
    return request


def attempt_entry(value: str, created_ms: int) -> dict[str, Any]:
    """One stored attempt (``AttemptRecord.compact`` after its time) as ``to_json`` shows it."""
    delta, number, outcome, status, cause, ms, cid = (value.split("|", 6) + [""] * 7)[:7]
    code = int(status) if status.lstrip("-").isdigit() else None
    return {
        "n": int(number) if number.lstrip("-").isdigit() else None,
        "at": created_ms + int(delta) if delta.lstrip("-").isdigit() else None,
        "outcome": _OUTCOMES.get(outcome, outcome),
        "status": code,
        "cause": cause or (f"http_{code}" if code is not None else ""),
        "ms": int(ms) if ms.lstrip("-").isdigit() else None,
        "cid": _long_cid(cid) or None,
    }


def expand_record(record: Mapping[str, Any], earlier: list[Any] | None = None) -> dict[str, Any]:
    """A stored record in the shape ``status`` answers (``earlier``: attempts kept in a list)."""
    out: dict[str, Any] = {
        name: value
        for name, value in record.items()
        if name not in ("u", "s", "t", "url", "du") and not _ATTEMPT_FIELD.fullmatch(name)
    }
    request = request_of(record)
    out["req"] = record["req"] if "req" in record else _dumps(request)
    out.setdefault("partner", partner_of(request))
    out.setdefault("replays", "0")
    try:
        created = int(record.get("created") or 0)
    except ValueError:
        created = 0
    if "du" in record and "updated" not in record:
        out["updated"] = str(created + _int(record["du"]))
    attempts = list(earlier or [])
    k = 1
    while f"a{k}" in record:
        attempts.append(attempt_entry(str(record[f"a{k}"]), created))
        k += 1
    out["attempts"] = attempts
    if out.get("state") == "delivered" and attempts and isinstance(attempts[-1], dict):
        last = attempts[-1]
        out.setdefault("attempt", "" if last.get("n") is None else str(last["n"]))
        out.setdefault("status", "" if last.get("status") is None else str(last["status"]))
        out.setdefault("cid", last.get("cid") or "")
    return out


_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def _short_cid(cid: str) -> str:
    # Concur's correlation ids are UUIDs: 36 characters as text, 23 as ``~`` + base64url.
    if _UUID.fullmatch(cid):
        return "~" + base64.urlsafe_b64encode(uuid.UUID(cid).bytes).decode("ascii").rstrip("=")
    return "~" + cid if cid.startswith("~") else cid


def _long_cid(stored: str) -> str:
    if stored.startswith("~~"):
        return stored[1:]
    if stored.startswith("~") and len(stored) == 23:
        try:
            return str(uuid.UUID(bytes=base64.urlsafe_b64decode(stored[1:] + "==")))
        except ValueError:
            return stored
    return stored


def _int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def _claim_from(reply: Any) -> Claim:
    if reply[0] != "go":
        return Claim(str(reply[0]), state=str(reply[1]))
    try:
        request = json.loads(reply[2])
    except ValueError:
        request = None
    return Claim("go", int(reply[1]), request if isinstance(request, dict) else None)


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def _loads_object(raw: Any) -> dict[str, Any]:
    try:
        value = json.loads(raw) if raw else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
