"""The dispatcher: feeds the Celery queue from the lanes, fairly, and keeps it shallow.

With ``NOTIFY_DISPATCH=fair`` (the default) a new message is not published at intake: it waits
in its lane, a list in Redis per (company, partner) (``keys.lane``). Each worker process runs
one ``Dispatcher`` thread; while fewer messages are dispatched and not yet claimed
(``keys.DISPATCHED``) than the depth (``NOTIFY_DISPATCH_DEPTH`` per live worker), it takes
messages from the lanes round-robin over companies, then over each company's partners
(``worker/store/lua/dispatch.lua``), and publishes them through the process's one publisher.
So a company with a backlog of 100,000 holds at most its share of a queue a fraction of a second
deep, and another company's message waits behind that, not behind the backlog.

Why nothing is lost or sent twice (docs/architecture.md): a lane lives in Redis; the script that
takes a message from it puts the message on the schedule a grace period ahead in the same atomic
step, so a dispatcher killed before it published is covered by the mover after the grace; two
dispatchers never take one message (the script pops it), and any extra copy of a task is fenced
off by ``claim`` as always. ``claim`` clears the message's ``dq`` flag and counts it off the
depth exactly once.

A company whose lanes may not be dispatched (not ``connected``, or its geolocation paused) keeps
them; the sweep here moves the lanes of a company that is disconnected, gone from the registry,
or past ``NOTIFY_COMPANY_RECONNECT_GRACE_SECONDS`` in ``needs_reconnect`` onto the schedule, due
now, so the workers settle those messages (dead letters ``company_disconnected``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from worker.delivery.mover import DEAD_AFTER_SECONDS, FLUSH_SECONDS, MAX_PAUSE_SECONDS, BrokerAway
from worker.limits.breaker import FORCED_OPEN, OPEN, Breakers
from worker.ops.background import Loop
from worker.queue.publisher import Publisher
from worker.settings import Settings
from worker.shapes.models import DEFAULT_COMPANY, is_company_id
from worker.store.codec import now_ms
from worker.store.companies import Company, CompanyRegistry
from worker.store.records import MessageStore

log = logging.getLogger("notify.dispatcher")

# Between two looks at the lanes when there was nothing to do (or no room in the queue).
INTERVAL_SECONDS = 0.02
# How often the lanes of companies that cannot be served are looked at.
SWEEP_SECONDS = 5.0
# Messages a company gives in its turn before the next company's turn: 1 is the fairest, and the
# script's work per message is the same whatever the quantum (one rotation of the ring each).
QUANTUM = 1
# Messages moved onto the schedule per script call when a company's lanes are swept.
SWEEP_BATCH = 1000
# Companies read from the registry per pipelined round trip when the lanes are swept.
SWEEP_READ_CHUNK = 500


@dataclass(frozen=True, slots=True)
class DispatchPolicy:
    """How the dispatcher feeds the queue (from the settings)."""

    batch: int  # messages per dispatch call (the publisher makes tasks of NOTIFY_BATCH_SIZE)
    task_size: int  # NOTIFY_BATCH_SIZE: the room below the depth is taken in whole tasks
    depth_per_worker: int  # dispatched and not yet claimed, per live worker process
    default_geolocation: str  # where the default company's messages go (scheme://host)
    reconnect_grace_ms: int  # how long a needs_reconnect company's lanes wait
    quantum: int = QUANTUM
    interval_seconds: float = INTERVAL_SECONDS
    sweep_seconds: float = SWEEP_SECONDS
    live_after_ms: int = int(DEAD_AFTER_SECONDS * 1000)

    @classmethod
    def from_settings(cls, settings: Settings) -> DispatchPolicy:
        """``NOTIFY_DISPATCH_DEPTH``, ``NOTIFY_BATCH_SIZE``, the API base URL,
        ``NOTIFY_COMPANY_RECONNECT_GRACE_SECONDS``."""
        return cls(
            batch=4 * settings.batch_size,
            task_size=settings.batch_size,
            depth_per_worker=settings.dispatch_depth_per_worker,
            default_geolocation=default_geolocation(settings.api_base_url),
            reconnect_grace_ms=int(settings.company_reconnect_grace_seconds * 1000),
        )


def default_geolocation(api_base_url: str) -> str:
    """The geolocation (``scheme://host[:port]``) of the default company: its API base URL's."""
    parts = urlsplit(api_base_url)
    return f"{parts.scheme}://{parts.netloc}"


def lanes_to_sweep(company: Company | None, *, now: int, reconnect_grace_ms: int) -> bool:
    """Whether a registry company's waiting messages must leave its lanes for the workers to
    settle: it is gone, disconnected, or waiting for reconnection longer than the grace."""
    if company is None or company.state == "disconnected":
        return True
    if company.state == "needs_reconnect":
        return now - (company.state_ms or 0) >= reconnect_grace_ms
    return False


def no_paused_geolocations() -> Sequence[str]:
    """No geolocation is paused."""
    return ()


class OpenBreakers:
    """The geolocations whose breaker is open, by breaker name (``default`` or ``host[:port]``),
    read at most once per ``refresh_seconds``: the dispatcher asks every few milliseconds, and a
    breaker stays open for many seconds. Their companies' lanes wait instead of being dispatched
    only to be paused by the worker."""

    def __init__(
        self,
        breakers: Breakers,
        refresh_seconds: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.breakers = breakers
        self.refresh_seconds = refresh_seconds
        self.clock = clock
        self._names: list[str] = []
        self._next = 0.0

    def __call__(self) -> Sequence[str]:
        now = self.clock()
        if now >= self._next and self.breakers.policy.enabled:
            self._next = now + self.refresh_seconds
            self._names = [
                name
                for name in self.breakers.names()
                if self.breakers.named(name).status().state in (OPEN, FORCED_OPEN)
            ]
        return self._names


class Dispatcher(Loop):
    """Moves messages from the lanes to the queue while the queue is shallower than the depth."""

    def __init__(
        self,
        store: MessageStore,
        publisher: Publisher,
        registry: CompanyRegistry,
        policy: DispatchPolicy,
        *,
        paused_geolocations: Callable[[], Sequence[str]] = no_paused_geolocations,
    ) -> None:
        self.store = store
        self.publisher = publisher
        self.registry = registry
        self.policy = policy
        self.paused_geolocations = paused_geolocations
        self._pause = policy.interval_seconds
        self._swept_at = 0.0
        super().__init__("notify-dispatcher")

    def run_once(self) -> int:
        """Dispatch and publish until the depth is reached or the lanes are empty; how many.

        Raises ``BrokerAway`` when the publisher could not put them on the queue in time (it
        keeps them and tries again; their schedule entries cover them meanwhile).
        """
        policy = self.policy
        paused = list(self.paused_geolocations())
        dispatched = 0
        while True:
            batch = self.store.dispatch(
                limit=policy.batch,
                depth_per_worker=policy.depth_per_worker,
                live_since_ms=now_ms() - policy.live_after_ms,
                quantum=policy.quantum,
                default_geolocation=policy.default_geolocation,
                paused_geolocations=paused,
                task_size=policy.task_size,
            )
            self.publisher.submit(batch)
            dispatched += len(batch)
            if len(batch) < policy.batch:
                break
        if dispatched and not self.publisher.flush(FLUSH_SECONDS):
            raise BrokerAway(dispatched)
        return dispatched

    def sweep(self) -> int:
        """Move the lanes of companies that will not be served again onto the schedule (due
        now); how many messages moved."""
        moved = 0
        now = now_ms()
        laned = [
            company_id
            for company_id in self.store.laned_companies()
            if company_id != DEFAULT_COMPANY and is_company_id(company_id)
        ]
        # Read in pipelines, not one round trip per company: a thousand companies with waiting
        # messages cost this thread a thousand round trips every sweep.
        known: dict[str, Company | None] = {}
        for start in range(0, len(laned), SWEEP_READ_CHUNK):
            known.update(self.registry.get_many(laned[start : start + SWEEP_READ_CHUNK]))
        for company_id in laned:
            company = known.get(company_id)
            if not lanes_to_sweep(
                company, now=now, reconnect_grace_ms=self.policy.reconnect_grace_ms
            ):
                continue
            count = 0
            while step := self.store.unlane(company_id, SWEEP_BATCH):
                count += step
            if count:
                log.warning(
                    "company %s is %s: its %d waiting messages go to the workers to be settled",
                    company_id,
                    "gone from the registry" if company is None else company.state,
                    count,
                )
            moved += count
        return moved

    def _step(self) -> float:
        try:
            if time.monotonic() - self._swept_at >= self.policy.sweep_seconds:
                self._swept_at = time.monotonic()
                self.sweep()
            self.run_once()
            self._pause = self.policy.interval_seconds
        except (RedisConnectionError, RedisTimeoutError) as error:
            log.warning("dispatcher: Redis unavailable (%s); next try in %.1fs", error, self._pause)
            self._pause = min(max(self._pause * 2, 0.5), MAX_PAUSE_SECONDS)
        except BrokerAway as error:
            log.warning("dispatcher: %s; next try in %.1fs", error, self._pause)
            self._pause = min(max(self._pause * 2, 0.5), MAX_PAUSE_SECONDS)
        except Exception:  # a bug: the thread goes on
            log.exception("dispatcher tick failed")
            self._pause = 1.0
        return self._pause
