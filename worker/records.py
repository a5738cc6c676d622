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

import json
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from worker import keys
from worker.models import partner_of

DELIVERED_COUNTER_TTL_SECONDS = 2 * 3600
# How long a new record waits for its replicas (``wait_replicas``) before it is accepted anyway.
WAIT_TIMEOUT_MS = 100
_wait_warned = 0.0
log = logging.getLogger("notify.records")

# Prepended to every script that changes a state: keeps the ``keys.LIVE`` gauges in step.
_GAUGES = """
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
-- A record made from a request alone (a task without a record, a replayed letter) takes the
-- request's partner, if it names one.
local function adopt_partner(record, req)
  local ok, parsed = pcall(cjson.decode, req)
  local name = ok and type(parsed) == 'table' and parsed['partner']
  if type(name) == 'string' and #name <= 64 and string.match(name, '^[a-z0-9][a-z0-9_.-]*$') then
    redis.call('HSET', record, 'partner', name)
  end
end
""".replace("@PARTNER_STATS@", keys.partner_stats(""))

_CREATE = """
-- KEYS: record, schedule, partners ; ARGV: id, request json, now ms, grace ms, partner
local state = redis.call('HGET', KEYS[1], 'state')
if state then
  return {0, state, redis.call('HGET', KEYS[1], 'gen')}
end
redis.call('HSET', KEYS[1], 'req', ARGV[2], 'state', 'queued', 'gen', 1, 'attempt', 0,
           'created', ARGV[3], 'updated', ARGV[3], 'replays', 0, 'partner', ARGV[5])
redis.call('SADD', KEYS[3], ARGV[5])
redis.call('ZADD', KEYS[2], tonumber(ARGV[3]) + tonumber(ARGV[4]), ARGV[1])
return {1, 'queued', '1'}
"""

_CLAIM = """
-- KEYS: record, schedule, live
-- ARGV: id, gen, now ms, lease ms, owner, worker, task id, request json
local now = tonumber(ARGV[3])
local state = redis.call('HGET', KEYS[1], 'state')
if not state then
  -- A task without a record: made by hand, or its record was lost. The task's copy of the
  -- request becomes the record, so it is tracked like any other.
  redis.call('HSET', KEYS[1], 'req', ARGV[8], 'state', 'queued', 'gen', ARGV[2], 'attempt', 0,
             'created', now, 'replays', 0)
  adopt_partner(KEYS[1], ARGV[8])
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
return {'go', tostring(attempt), redis.call('HGET', KEYS[1], 'req')}
"""

_DELIVERED = """
-- KEYS: record, schedule, attempts, stats, delivered-this-minute, live
-- ARGV: id, now ms, attempt entry, status, correlation id, ttl s, counter ttl s
local state = redis.call('HGET', KEYS[1], 'state')
if state == 'delivered' or state == 'failed' then return 0 end
-- A 2xx is the truth even if this worker's lease ran out: record it.
shift(KEYS[6], state, 'delivered')
redis.call('HSET', KEYS[1], 'state', 'delivered', 'status', ARGV[4], 'cid', ARGV[5],
           'updated', ARGV[2], 'lease', 0)
redis.call('HDEL', KEYS[1], 'next', 'owner')
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('RPUSH', KEYS[3], ARGV[3])
redis.call('EXPIRE', KEYS[1], ARGV[6])
redis.call('EXPIRE', KEYS[3], ARGV[6])
redis.call('HINCRBY', KEYS[4], 'delivered', 1)
by_partner(KEYS[1], 'delivered')
redis.call('INCR', KEYS[5])
redis.call('EXPIRE', KEYS[5], ARGV[7])
return 1
"""

_RETRY = """
-- KEYS: record, schedule, attempts, stats, live
-- ARGV: id, owner, now ms, due ms, entry, status, cid
if redis.call('HGET', KEYS[1], 'state') ~= 'inflight'
   or redis.call('HGET', KEYS[1], 'owner') ~= ARGV[2] then
  return 0  -- this worker lost the message (its lease ran out); the new holder decides
end
local gen = redis.call('HINCRBY', KEYS[1], 'gen', 1)
redis.call('HSET', KEYS[1], 'state', 'retrying', 'next', ARGV[4], 'status', ARGV[6],
           'cid', ARGV[7], 'updated', ARGV[3], 'lease', 0)
redis.call('HDEL', KEYS[1], 'owner')
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[1])
redis.call('RPUSH', KEYS[3], ARGV[5])
redis.call('HINCRBY', KEYS[4], 'retried', 1)
by_partner(KEYS[1], 'retried')
shift(KEYS[5], 'inflight', 'retrying')
return gen
"""

_DEAD = """
-- KEYS: record, schedule, attempts, dead letter, dead index, stats, live
-- ARGV: id, owner ('' = no owner check), now ms, entry ('' = none), request json (if no record),
--       reason, detail, status, errors json, cid, task, worker
local state = redis.call('HGET', KEYS[1], 'state')
if ARGV[2] ~= '' and (state ~= 'inflight' or redis.call('HGET', KEYS[1], 'owner') ~= ARGV[2]) then
  return 0
end
if state == 'delivered' or state == 'failed' then return 0 end
if not state then
  redis.call('HSET', KEYS[1], 'req', ARGV[5], 'gen', 1, 'attempt', 0, 'created', ARGV[3],
             'replays', 0)
  adopt_partner(KEYS[1], ARGV[5])
end
shift(KEYS[7], state, 'failed')
redis.call('HSET', KEYS[1], 'state', 'failed', 'reason', ARGV[6], 'status', ARGV[8],
           'cid', ARGV[10], 'updated', ARGV[3], 'lease', 0)
redis.call('HDEL', KEYS[1], 'next', 'owner')
redis.call('PERSIST', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
if ARGV[4] ~= '' then redis.call('RPUSH', KEYS[3], ARGV[4]) end
local r = redis.call('HMGET', KEYS[1], 'req', 'attempt', 'first', 'last', 'replays', 'created')
local replaced = redis.call('HGET', KEYS[4], 'reason')
if replaced then redis.call('HINCRBY', KEYS[7], 'dead:' .. replaced, -1) end
redis.call('DEL', KEYS[4])
redis.call('HSET', KEYS[4], 'id', ARGV[1], 'req', r[1], 'reason', ARGV[6], 'detail', ARGV[7],
           'status', ARGV[8], 'errors', ARGV[9], 'cid', ARGV[10], 'task', ARGV[11],
           'worker', ARGV[12], 'attempts', r[2] or 0, 'first', r[3] or '', 'last', r[4] or '',
           'replays', r[5] or 0, 'created', r[6] or ARGV[3], 'dead', ARGV[3])
redis.call('ZADD', KEYS[5], ARGV[3], ARGV[1])
redis.call('HINCRBY', KEYS[6], 'dead:' .. ARGV[6], 1)
by_partner(KEYS[1], 'dead:' .. ARGV[6])
redis.call('HINCRBY', KEYS[7], 'dead:' .. ARGV[6], 1)
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
-- KEYS: record, schedule, stats, live, attempts
-- ARGV: id, owner, now ms, due ms, attempt entry ('' = none)
if redis.call('HGET', KEYS[1], 'state') ~= 'inflight'
   or redis.call('HGET', KEYS[1], 'owner') ~= ARGV[2] then
  return 0  -- this worker lost the message (its lease ran out); the new holder decides
end
if ARGV[5] ~= '' then redis.call('RPUSH', KEYS[5], ARGV[5]) end
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

_DUE = """
-- KEYS: schedule ; ARGV: now ms, limit, grace ms, record key prefix
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
local out = {}
local regrace = tonumber(ARGV[1]) + tonumber(ARGV[3])
for _, id in ipairs(ids) do
  local r = redis.call('HMGET', ARGV[4] .. id, 'state', 'gen', 'req')
  if (not r[1]) or r[1] == 'delivered' or r[1] == 'failed' then
    redis.call('ZREM', KEYS[1], id)
  else
    -- Not removed: it stays scheduled (a grace period ahead) until a worker claims it, so a
    -- crash between this script and the publish below cannot lose it.
    redis.call('ZADD', KEYS[1], regrace, id)
    table.insert(out, id)
    table.insert(out, r[2])
    table.insert(out, r[3])
  end
end
return out
"""


def now_ms() -> int:
    """Wall-clock milliseconds, the unit of every time stored in Redis."""
    return int(time.time() * 1000)


@dataclass(frozen=True, slots=True)
class Envelope:
    """What a ``send_message`` task carries: the message id, its generation, the request."""

    id: str
    gen: int
    request: dict[str, Any]

    def to_task(self) -> dict[str, Any]:
        """The task argument."""
        return {"id": self.id, "gen": self.gen, "req": self.request}


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
    ) -> None:
        self.redis = redis
        # New records wait (Redis WAIT) until this many replicas hold them: a failover then
        # cannot lose a message that was answered "queued" (docs/scaling.md).
        self.wait_replicas = wait_replicas
        self.publish_grace_ms = int(publish_grace_seconds * 1000)
        self.lease_ms = int(lease_seconds * 1000)
        self.status_ttl_seconds = status_ttl_seconds
        self._create = redis.register_script(_CREATE)
        self._claim = redis.register_script(_GAUGES + _CLAIM)
        self._delivered = redis.register_script(_GAUGES + _DELIVERED)
        self._retry = redis.register_script(_GAUGES + _RETRY)
        self._dead = redis.register_script(_GAUGES + _DEAD)
        self._replay = redis.register_script(_GAUGES + _REPLAY)
        self._due = redis.register_script(_DUE)
        self._defer = redis.register_script(_GAUGES + _DEFER)
        self._forget = redis.register_script(_GAUGES + _FORGET)
        self._local = threading.local()

    def _persist(self, script: Any, *, keys: list[str], args: list[Any]) -> Any:
        """Run an outcome script, waiting out a short Redis outage (a restart) to do so.

        An outcome not written leaves the message in flight until its lease ends, and then it is
        attempted again: after a 2xx, that would post it twice. So a connection error is retried
        for up to half the lease. The scripts are safe to repeat: each checks the state (and the
        owner) first, so a write that landed but whose reply was lost changes nothing again.
        """
        deadline = time.monotonic() + self.lease_ms / 2000
        pause = 0.1
        while True:
            try:
                return self._run(script, keys=keys, args=args)
            except (RedisConnectionError, RedisTimeoutError):
                if time.monotonic() + pause > deadline:
                    raise
                time.sleep(pause)
                pause = min(pause * 2, 1.0)

    def _run(self, script: Any, *, keys: list[str], args: list[Any]) -> Any:
        """Run ``script`` (a redis-py ``Script``) on this thread's Redis client.

        redis-py does the rest: a script Redis forgot (a restart, SCRIPT FLUSH, a failover) is
        loaded again and run once more, and a connection Redis dropped is replaced and the call
        made once more on the new one. Every script is safe to repeat (see ``_persist``).
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
                _dumps(request),
                now_ms(),
                self.publish_grace_ms,
                partner_of(request),
            ],
        )
        if self.wait_replicas:
            self._replicated(self._conn().wait(*self._wait_args()))
        return bool(int(created)), str(state)

    def _wait_args(self) -> tuple[int, int]:
        return self.wait_replicas, WAIT_TIMEOUT_MS

    def _replicated(self, acknowledged: Any) -> None:
        global _wait_warned
        if int(acknowledged) < self.wait_replicas and time.monotonic() - _wait_warned > 60:
            _wait_warned = time.monotonic()
            log.warning(
                "new records reached %s of %d replicas within %d ms (no replica connected?); "
                "a failover now could lose them",
                acknowledged,
                self.wait_replicas,
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
                args=[message_id, _dumps(request), now, self.publish_grace_ms, partner_of(request)],
                client=pipe,
            )
        if self.wait_replicas:  # same connection, so it waits for these writes
            pipe.wait(*self._wait_args())
        replies = pipe.execute()
        if self.wait_replicas:
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
        client: Any = self._conn() if len(items) == 1 else self.redis.pipeline(transaction=False)
        for envelope, owner in items:
            call = self._claim(
                keys=[keys.message(envelope.id), keys.SCHEDULE, keys.LIVE],
                args=[
                    envelope.id,
                    envelope.gen,
                    now,
                    self.lease_ms,
                    owner,
                    worker,
                    task_id,
                    _dumps(envelope.request),
                ],
                client=client,
            )
        replies = [call] if len(items) == 1 else client.execute()
        return [_claim_from(reply) for reply in replies]

    def delivered(self, message_id: str, attempt: AttemptRecord) -> bool:
        """Record a 2xx; False when the message had already finished."""
        minute = attempt.at_ms // 60000
        return bool(
            self._persist(
                self._delivered,
                keys=[
                    keys.message(message_id),
                    keys.SCHEDULE,
                    keys.attempts(message_id),
                    keys.STATS,
                    f"{keys.DELIVERED_PER_MINUTE}:{minute}",
                    keys.LIVE,
                ],
                args=[
                    message_id,
                    now_ms(),  # "updated": when the outcome was known, not when the post began
                    attempt.to_json(),
                    attempt.status or "",
                    attempt.correlation_id or "",
                    self.status_ttl_seconds,
                    DELIVERED_COUNTER_TTL_SECONDS,
                ],
            )
        )

    def retry(self, message_id: str, owner: str, due_ms: int, attempt: AttemptRecord) -> bool:
        """Schedule the next attempt at ``due_ms``; False when this worker no longer holds it."""
        return bool(
            self._persist(
                self._retry,
                keys=[
                    keys.message(message_id),
                    keys.SCHEDULE,
                    keys.attempts(message_id),
                    keys.STATS,
                    keys.LIVE,
                ],
                args=[
                    message_id,
                    owner,
                    now_ms(),
                    due_ms,
                    attempt.to_json(),
                    attempt.status or "",
                    attempt.correlation_id or "",
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
            self._persist(
                self._dead,
                keys=[
                    keys.message(message_id),
                    keys.SCHEDULE,
                    keys.attempts(message_id),
                    keys.dead_letter(message_id),
                    keys.DEAD_INDEX,
                    keys.STATS,
                    keys.LIVE,
                ],
                args=[
                    message_id,
                    owner,
                    attempt.at_ms if attempt else now_ms(),
                    attempt.to_json() if attempt else "",
                    stored_request,
                    failure.reason,
                    failure.detail,
                    failure.status or "",
                    _dumps(failure.errors or []),
                    failure.correlation_id or "",
                    failure.task_id,
                    failure.worker,
                ],
            )
        )

    def replay(self, message_id: str) -> Envelope | None:
        """Move a dead letter back to queued (new generation); None if there is no such letter."""
        reply = self._replay(
            keys=[
                keys.message(message_id),
                keys.SCHEDULE,
                keys.dead_letter(message_id),
                keys.DEAD_INDEX,
                keys.STATS,
                keys.LIVE,
            ],
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
            self._persist(
                self._defer,
                keys=[
                    keys.message(message_id),
                    keys.SCHEDULE,
                    keys.STATS,
                    keys.LIVE,
                    keys.attempts(message_id),
                ],
                args=[message_id, owner, now_ms(), due_ms, attempt.to_json() if attempt else ""],
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

    def status(self, message_id: str) -> dict[str, Any] | None:
        """The status record and attempt history of one message, or None."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.hgetall(keys.message(message_id))
        pipe.lrange(keys.attempts(message_id), 0, -1)
        record, attempts = pipe.execute()
        if not record:
            return None
        record["attempts"] = [json.loads(entry) for entry in attempts]
        return dict(record)


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
