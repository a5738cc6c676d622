"""Message status records in Redis, changed only by atomic Lua scripts (worker/store/lua/).

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

``cancel`` ends a ``queued`` or ``retrying`` message as ``cancelled`` (a partner's ``DELETE
/messages/{id}``): off the schedule, a new generation, and every claim refuses it as ``done``;
one ``inflight`` or finished is refused. A message's deadline (its record's ``exp``) caps every
time it is due again (``retry``, ``defer``, ``create``), and a claim past it answers ``expired``
(taken under the claimer's owner, no attempt counted) for the worker to dead-letter it.
An explicit idempotency key (``keys.idempotency``) is taken by ``create`` in the same step as the
record, so concurrent requests under one key record one message.

Operators' gauges (``keys.LIVE``: messages ``inflight`` and ``retrying`` now, dead letters held
now by ``dead:<reason>``) are changed by the same scripts that change a state, in the same
atomic step, so they are exact as long as only these scripts write the records.

The stored form (compact requests and attempts) is ``codec``'s, shared with the history.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

from redis import Redis

from worker.queue.envelopes import Envelope
from worker.settings import Settings
from worker.shapes.models import DEFAULT_COMPANY, company_of, partner_of
from worker.store import keys
from worker.store.codec import (
    AttemptRecord,
    Claim,
    Failure,
    StatusRecord,
    attempts_list,
    claim_from,
    dumps,
    expand_record,
    loads_object,
    now_ms,
    request_fields,
)
from worker.store.history import read_status

DELIVERED_COUNTER_TTL_SECONDS = 2 * 3600
log = logging.getLogger("notify.records")

_LUA = resources.files("worker.store") / "lua"
# The schedule entries one call of orphans.lua looks at (a few milliseconds of Redis's time).
ORPHAN_CHUNK = 2000
# The helpers a script may call, prepended to it: ``request`` (the stored request as JSON, field
# pairs onto a record) and ``gauges`` (which keeps the ``keys.LIVE`` gauges in step and adds
# attempts and history outbox entries), which needs ``request``.
SCRIPTS: dict[str, tuple[str, ...]] = {
    "create": ("request",),
    "claim": ("request", "gauges"),
    "delivered": ("request", "gauges", "webhook"),
    "retry": ("request", "gauges"),
    "dead": ("request", "gauges", "webhook"),
    "replay": ("request", "gauges"),
    "defer": ("request", "gauges"),
    "forget": ("request", "gauges"),
    "due": ("request",),
    "dispatch": ("request",),
    "unlane": ("request",),
    "cancel": ("request", "gauges"),
    "orphans": ("request",),
}


@functools.cache
def script_source(name: str) -> str:
    """The full text of the Lua script ``name`` (worker/store/lua/<name>.lua after its helpers).

    Each file is one part; a part starts on a new line, so the composed text is one Lua chunk in
    which the helpers are locals the script below them calls.
    """
    parts = [*SCRIPTS[name], name]
    text = "".join("\n" + (_LUA / f"{part}.lua").read_text(encoding="utf-8") for part in parts)
    return (
        text.replace("@PARTNER_STATS@", keys.partner_stats(""))
        .replace("@COMPANY_WAITING@", keys.COMPANY_WAITING)
        .replace("@WEBHOOK@", keys.webhook(""))
        .replace("@WEBHOOK_EVENT@", keys.webhook_event(""))
        .replace("@WEBHOOK_SCHEDULE@", keys.WEBHOOK_SCHEDULE)
    )


@dataclass(frozen=True, slots=True)
class ReplicaWait:
    """How a new record waits (Redis ``WAIT``) for its replicas before it is accepted anyway.

    With ``replicas`` replicas holding it, a failover cannot lose a message that was answered
    "queued" (docs/scaling.md); 0 waits for none.
    """

    replicas: int = 0
    timeout_ms: int = 100
    # A record that reached fewer replicas in time is logged at most this often.
    warn_every_seconds: float = 60.0

    @classmethod
    def from_settings(cls, settings: Settings) -> ReplicaWait:
        """``NOTIFY_REDIS_WAIT_REPLICAS`` (1 with Sentinel, else 0)."""
        return cls(replicas=settings.wait_replicas)


def webhook_event_id() -> str:
    """A new outcome event's id (its ``webhook-id``): random, so a message that ends twice (a
    replayed dead letter) or an id used again after its record expired never repeats one."""
    return "evt_" + uuid.uuid4().hex


@dataclass(frozen=True, slots=True)
class NewRecord:
    """What a new message's record carries beside its request: its deadline, and the explicit
    idempotency key it was sent under (its Redis key name, the request's fingerprint, how long
    the key is held)."""

    expires_ms: int | None = None
    idempotency_key: str | None = None  # keys.idempotency(...)
    fingerprint: str = ""
    window_seconds: int = 86_400


@dataclass(frozen=True, slots=True)
class KeyConflict:
    """The explicit idempotency key was used, within its window, for another request: nothing
    was recorded; ``existing_id`` is the message that request made."""

    existing_id: str


Created = tuple[bool, str]  # (created, state): state of the earlier message when not created


def _back_on_schedule_keys(message_id: str) -> list[str]:
    # KEYS of the two scripts that put a claimed message back on the schedule (retry, defer).
    return [keys.message(message_id), keys.SCHEDULE, keys.STATS, keys.LIVE, keys.HISTORY_OUTBOX]


def _dead_letter_keys(message_id: str) -> list[str]:
    # The KEYS a dead letter's scripts share (dead, which adds the history outbox; replay).
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
        replica_wait: ReplicaWait | None = None,
        history: bool = False,
        history_url: str | None = None,
        laned: bool = False,
        dispatch_grace_seconds: float | None = None,
    ) -> None:
        self.redis = redis
        # New messages wait in their company's lanes for the dispatcher (NOTIFY_DISPATCH=fair)
        # instead of being published at intake (fifo).
        self.laned = laned
        # Every attempt and outcome also goes to the history outbox (``NOTIFY_HISTORY_URL``).
        self.history = history
        # Where ``lookup`` finds a message Redis no longer holds (None: nowhere).
        self.history_url = history_url
        # New records wait (Redis WAIT) until this many replicas hold them.
        self.replica_wait = replica_wait or ReplicaWait()
        self._replicas_connected = 0
        self._replicas_checked = -1e9
        self._wait_warned: float | None = None
        self.publish_grace_ms = int(publish_grace_seconds * 1000)
        # A dispatched message waits this long for its claim before the mover republishes it
        # (None: the publish grace).
        self.dispatch_grace_ms = int((dispatch_grace_seconds or publish_grace_seconds) * 1000)
        self.lease_ms = int(lease_seconds * 1000)
        self.status_ttl_seconds = status_ttl_seconds
        # redis-py ``Script`` objects: run by their SHA, loaded again when Redis forgot them.
        scripts = {name: redis.register_script(script_source(name)) for name in SCRIPTS}
        self._create = scripts["create"]
        self._claim = scripts["claim"]
        self._delivered = scripts["delivered"]
        self._retry = scripts["retry"]
        self._dead = scripts["dead"]
        self._replay = scripts["replay"]
        self._due = scripts["due"]
        self._defer = scripts["defer"]
        self._forget = scripts["forget"]
        self._dispatch = scripts["dispatch"]
        self._unlane = scripts["unlane"]
        self._cancel = scripts["cancel"]
        self._orphans = scripts["orphans"]
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
        [result] = self.create_each([(message_id, request)])
        assert not isinstance(result, KeyConflict)  # no explicit key, no conflict
        return result

    def _create_call(
        self, message_id: str, request: Mapping[str, Any], now: int, extra: NewRecord | None
    ) -> dict[str, list[Any]]:
        # The KEYS and ARGV of create.lua for one message: its lane's keys when laned.
        partner = partner_of(request)
        company = company_of(request)
        extra = extra or NewRecord()
        return {
            "keys": [
                keys.message(message_id),
                keys.SCHEDULE,
                keys.PARTNERS,
                keys.lane(company, partner),
                keys.company_lanes(company),
                keys.LANES,
                keys.LIVE,
                extra.idempotency_key or keys.message(message_id),
            ],
            "args": [
                message_id,
                now,
                self.publish_grace_ms,
                partner,
                company if self.laned else "",
                extra.fingerprint if extra.idempotency_key else "",
                extra.window_seconds,
                "" if extra.expires_ms is None else extra.expires_ms,
                *request_fields(request),
            ],
        }

    def _replicas_to_wait(self) -> int:
        # WAIT for replicas that are connected (asked at most once a second): with none (the
        # old master not yet back after a failover), there is nothing a failover could lose
        # these writes to, and every acceptance would pay the whole timeout.
        wanted = self.replica_wait.replicas
        if not wanted:
            return 0
        if time.monotonic() - self._replicas_checked > 1.0:
            info = self.redis.info("replication")
            self._replicas_connected = int(info.get("connected_slaves", 0))
            self._replicas_checked = time.monotonic()
        return min(wanted, self._replicas_connected)

    def _wait_args(self) -> tuple[int, int]:
        return self._replicas_to_wait(), self.replica_wait.timeout_ms

    def _replicated(self, acknowledged: Any) -> None:
        wanted = self._replicas_to_wait()
        if int(acknowledged) >= wanted:
            return
        now = time.monotonic()
        if (
            self._wait_warned is None
            or now - self._wait_warned > self.replica_wait.warn_every_seconds
        ):
            self._wait_warned = now
            log.warning(
                "new records reached %s of %d replicas within %d ms; a failover now could "
                "lose them",
                acknowledged,
                wanted,
                self.replica_wait.timeout_ms,
            )

    def create_many(self, items: list[tuple[str, Mapping[str, Any]]]) -> list[tuple[bool, str]]:
        """``create`` for many messages in one round trip."""
        results = self.create_each(items)
        return [result for result in results if not isinstance(result, KeyConflict)]

    def create_each(
        self,
        items: Sequence[tuple[str, Mapping[str, Any]]],
        extras: Sequence[NewRecord | None] | None = None,
    ) -> list[Created | KeyConflict]:
        """Record new messages in one round trip, each with its ``NewRecord`` (deadline,
        explicit idempotency key); per message ``(created, state)``, or ``KeyConflict`` when its
        key was used for another request within the window (nothing recorded)."""
        now = now_ms()
        calls = [
            self._create_call(message_id, request, now, extras[i] if extras else None)
            for i, (message_id, request) in enumerate(items)
        ]
        waiting = self._replicas_to_wait()
        if len(calls) == 1:  # the single call is the cheaper round trip
            replies = [self._run(self._create, **calls[0])]
            if waiting:
                self._replicated(self._conn().wait(*self._wait_args()))
        else:
            pipe = self.redis.pipeline(transaction=False)
            for call in calls:
                self._create(**call, client=pipe)
            if waiting:  # same connection, so it waits for these writes
                pipe.wait(*self._wait_args())
            replies = pipe.execute()
            if waiting:
                self._replicated(replies.pop())
        results: list[Created | KeyConflict] = []
        for created, state, third in replies:
            if int(created) == 2:
                results.append(KeyConflict(str(third)))
            else:
                results.append((bool(int(created)), str(state)))
        return results

    def cancel(self, message_id: str, *, partner: str | None) -> tuple[str, str]:
        """Cancel a message not yet posted: ``("cancelled", state before)`` (also when it was
        cancelled already), ``("refused", state)`` once an attempt is under way or over, or
        ``("missing", "")`` when there is no such message of ``partner``'s (None: any
        partner's, for operators)."""
        verdict, state = self._run(
            self._cancel,
            keys=[
                keys.message(message_id),
                keys.SCHEDULE,
                keys.LIVE,
                keys.DISPATCHED,
                keys.STATS,
                keys.HISTORY_OUTBOX,
            ],
            args=[message_id, partner or "", now_ms(), self.status_ttl_seconds, self._history_flag],
        )
        return str(verdict), str(state)

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
                [keys.message(envelope.id), keys.SCHEDULE, keys.LIVE, keys.DISPATCHED],
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
            return [claim_from(self._run(self._claim, keys=call_keys, args=call_args))]
        pipe = self.redis.pipeline(transaction=False)
        for call_keys, call_args in calls:
            self._claim(keys=call_keys, args=call_args, client=pipe)
        return [claim_from(reply) for reply in pipe.execute()]

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
                    # Used only if the partner's webhook takes message.delivered (webhook.lua).
                    webhook_event_id(),
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
        stored_request = request if isinstance(request, str) else dumps(request or {})
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
                    dumps(failure.errors or []),
                    failure.correlation_id or "",
                    failure.task_id,
                    failure.worker,
                    attempt.compact() if attempt else "",
                    partner_of(loads_object(stored_request)),
                    self._history_flag,
                    webhook_event_id(),
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
        return Envelope(message_id, int(reply[0]), loads_object(reply[1]))

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
            Envelope(str(flat[i]), int(flat[i + 1]), loads_object(flat[i + 2]))
            for i in range(0, len(flat), 3)
        ]

    def publish_orphans(
        self, *, cutoff_ms: int, live_since_ms: int, chunk: int = ORPHAN_CHUNK
    ) -> tuple[int, bool]:
        """Put at the head of the schedule the messages a dead worker popped off the queue and
        died before noting (orphans.lua), if a takeover opened an audit; ``cutoff_ms``: the
        queue has moved past what was published then (read when a pass starts). Looks at up
        to ``chunk`` schedule entries a call; returns how many it found (-1 with no audit
        open) and whether the pass goes on.
        """
        found, more = self._orphans(
            keys=[keys.ORPHAN_AUDIT, keys.SCHEDULE, keys.WORKERS],
            args=[
                cutoff_ms,
                now_ms(),
                self.publish_grace_ms,
                self.dispatch_grace_ms,
                keys.message(""),
                keys.held(""),
                live_since_ms,
                chunk,
            ],
        )
        return int(found), bool(int(more))

    def dispatch(
        self,
        *,
        limit: int,
        depth_per_worker: int,
        live_since_ms: int,
        quantum: int,
        default_geolocation: str,
        paused_geolocations: Sequence[str] = (),
        max_skips: int = 1000,
        task_size: int = 1,
    ) -> list[Envelope]:
        """Take up to ``limit`` messages from the lanes, round-robin over companies then
        partners, while fewer than ``depth_per_worker`` times the live workers (heartbeat since
        ``live_since_ms``) are dispatched and not yet claimed.

        Each is put on the schedule ``dispatch_grace_ms`` ahead and flagged dispatched, in the same
        atomic step, so a crash or a partition before it is published loses nothing and delays it
        little: the mover publishes it after that grace. Companies not ``connected``, or whose
        geolocation is in ``paused_geolocations``, are passed over (their lanes wait). The room
        below the depth is taken in whole multiples of ``task_size`` (``NOTIFY_BATCH_SIZE``), so the
        tasks made from it are full.
        """
        flat = self._run(
            self._dispatch,
            keys=[
                keys.LANES,
                keys.DISPATCHED,
                keys.SCHEDULE,
                keys.LIVE,
                keys.WORKERS,
                keys.LANES_TURN,
            ],
            args=[
                now_ms(),
                limit,
                self.dispatch_grace_ms,
                keys.message(""),
                keys.LANE_PREFIX,
                keys.company_lanes(""),
                keys.company(""),
                depth_per_worker,
                live_since_ms,
                quantum,
                max_skips,
                DEFAULT_COMPANY,
                default_geolocation,
                task_size,
                *paused_geolocations,
            ],
        )
        return [
            Envelope(str(flat[i]), int(flat[i + 1]), loads_object(flat[i + 2]))
            for i in range(0, len(flat), 3)
        ]

    def laned_companies(self) -> list[str]:
        """The companies with messages waiting in a lane (the dispatcher's ring, in its order)."""
        return [str(name) for name in self.redis.lrange(keys.LANES, 0, -1)]

    def unlane(self, company_id: str, limit: int = 1000) -> int:
        """Move up to ``limit`` of a company's laned messages onto the schedule, due now; how
        many moved (0: its lanes are empty)."""
        return int(
            self._run(
                self._unlane,
                keys=[keys.LANES, keys.company_lanes(company_id), keys.SCHEDULE, keys.LIVE],
                args=[company_id, now_ms(), limit, keys.LANE_PREFIX],
            )
        )

    @property
    def _history_flag(self) -> str:
        return "1" if self.history else "0"

    def status(self, message_id: str) -> dict[str, Any] | None:
        """The status record and attempt history of one message in Redis, or None.

        The shape every reader knows, whatever the stored form: ``req`` as JSON, ``attempts`` as
        a list of ``AttemptRecord.to_json`` objects, and a delivered message's last HTTP status
        and correlation id (``status``, ``cid``) from its last attempt. ``lookup`` gives it as a
        ``StatusRecord``, from the history too.
        """
        pipe = self.redis.pipeline(transaction=False)
        pipe.hgetall(keys.message(message_id))
        # Records from before attempts were folded in keep theirs in a list until they expire.
        pipe.lrange(keys.attempts(message_id), 0, -1)
        record, attempts = pipe.execute()
        if not record:
            return None
        return expand_record(record, attempts_list(attempts))

    def lookup(self, message_id: str) -> StatusRecord | None:
        """A message's status record: Redis first, then the history (``history_url``) once
        Redis no longer holds it; None when neither does (or the history cannot be read)."""
        fields = self.status(message_id)
        if fields is None and self.history_url:
            fields = read_status(self.history_url, message_id)
        return None if fields is None else StatusRecord.from_fields(fields)
