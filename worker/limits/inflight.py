"""The cap on one worker process's posts in flight (``NOTIFY_MAX_IN_FLIGHT``), and its gauge.

A post whose 2xx was answered but not yet written to Redis is posted again if the process is
SIGKILLed (at-least-once's one window, docs/architecture.md), so the posts a process has in
flight are what a crash of it may cost in double posts. Without a cap that is up to
``NOTIFY_WORKER_CONCURRENCY`` x ``NOTIFY_BATCH_SIZE`` (64 x 20 = 1,280 by default).

A batch takes a slot for each of its messages **before** claiming them, all at once or none,
and gives each back when the message's outcome is written (or when it will not be posted after
all). All or none, because a batch holding some slots while waiting for more could wait forever
on other batches doing the same; before the claim, because a wait for slots must not eat into
the claims' leases. ``may_start`` is that decision, pure.

``InFlightGauge``, a thread in each worker process, writes the process's figure (the most slots
taken at once since its previous write) to ``keys.POSTS_IN_FLIGHT`` four times a second, and
within milliseconds when it grows, for
``/metrics`` (``notify_posts_in_flight``) and for whoever must know what a crash would cost now;
a dead worker's figure is removed when it is taken over (worker.delivery.mover).
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable

from redis import Redis
from redis.exceptions import RedisError

from worker.ops.background import Loop
from worker.store import keys

log = logging.getLogger("notify.inflight")

# How often a batch waiting for slots looks at whether the worker is shutting down.
STOP_CHECK_SECONDS = 1.0
# How often the gauge is written, and sooner (but at most every GAUGE_MIN_SECONDS) when more
# posts are in flight than it last said: a drain at a 20 ms API goes from nothing to hundreds in
# flight within a fraction of a second, and the figure must not lag behind what a crash costs.
GAUGE_SECONDS = 0.25
GAUGE_MIN_SECONDS = 0.005


def may_start(in_flight: int, wanted: int, cap: int) -> bool:
    """Whether a batch wanting ``wanted`` slots may take them now, ``in_flight`` being taken.

    ``cap`` 0 means no cap. A batch larger than the cap (``NOTIFY_BATCH_SIZE`` above it) goes
    alone, so it is never held back for good: the bound is then the batch size.
    """
    if cap <= 0 or wanted <= 0:
        return True
    if wanted > cap:
        return in_flight == 0
    return in_flight + wanted <= cap


def _never() -> bool:
    return False


class _Ticket:
    """A batch waiting for slots, in line."""

    __slots__ = ("granted", "wanted")

    def __init__(self, wanted: int) -> None:
        self.wanted = wanted
        self.granted = threading.Event()


class InFlight:
    """The slots of one process: how many are taken, and the most taken since last asked.

    Batches that must wait queue in arrival order and are handed their slots by whoever gives
    some back: one wake-up for the batch that can go, rather than every waiting thread woken at
    each answer (64 threads, hundreds of answers a second).
    """

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self._taken = 0
        self._peak = 0
        self._line: collections.deque[_Ticket] = collections.deque()
        self._lock = threading.Lock()
        self._reported = 0
        # Set when more slots are taken than the gauge last wrote: it writes again at once.
        self.grown = threading.Event()

    @property
    def taken(self) -> int:
        """Slots taken now (messages claimed or being claimed for a post, outcome not written)."""
        return self._taken

    def take(self, wanted: int, stopping: Callable[[], bool] = _never) -> bool:
        """Wait until ``wanted`` slots are free and take them; False (none taken) once
        ``stopping()`` says the worker is shutting down."""
        with self._lock:
            if not self._line and may_start(self._taken, wanted, self.cap):
                self._grant(wanted)
                return True
            ticket = _Ticket(wanted)
            self._line.append(ticket)
        while not ticket.granted.is_set():
            if stopping():
                with self._lock:
                    if ticket.granted.is_set():
                        return True  # handed its slots meanwhile: the caller goes on
                    self._line.remove(ticket)
                    self._hand_over()  # those behind it may fit now
                return False
            ticket.granted.wait(STOP_CHECK_SECONDS)
        return True

    def give(self, count: int) -> None:
        """Give ``count`` slots back (to the batches waiting, first in line first)."""
        if count <= 0:
            return
        with self._lock:
            self._taken = max(0, self._taken - count)
            self._hand_over()

    def peak(self) -> int:
        """The most slots taken at once since the previous call (the gauge's figure); the
        figure starts again from those taken now."""
        with self._lock:
            peak, self._peak = self._peak, self._taken
            self._reported = peak
            self.grown.clear()
            return peak

    def _grant(self, wanted: int) -> None:
        # Called with the lock held.
        self._taken += wanted
        self._peak = max(self._peak, self._taken)
        if self._taken > self._reported:
            self.grown.set()

    def _hand_over(self) -> None:
        # Called with the lock held: in order, as long as the first in line fits.
        while self._line and may_start(self._taken, self._line[0].wanted, self.cap):
            ticket = self._line.popleft()
            self._grant(ticket.wanted)
            ticket.granted.set()


class InFlightGauge(Loop):
    """Writes one process's posts in flight to ``keys.POSTS_IN_FLIGHT`` every ``GAUGE_SECONDS``."""

    def __init__(self, redis: Redis, worker: str, in_flight: InFlight) -> None:
        self.redis = redis
        self.worker = worker
        self.in_flight = in_flight
        super().__init__("notify-in-flight")

    def write(self) -> int:
        """Write the figure once (the most posts in flight since the last write); returns it."""
        peak = self.in_flight.peak()
        self.redis.hset(keys.POSTS_IN_FLIGHT, self.worker, peak)
        return peak

    def _step(self) -> float:
        try:
            self.write()
        except RedisError as error:
            # A gauge: the next write catches up; Redis outages are reported by the mover.
            log.debug("in-flight gauge not written (%s)", error)
            return GAUGE_SECONDS
        return GAUGE_MIN_SECONDS

    def _run(self) -> None:
        while not self._stop.is_set():
            self._stop.wait(self._step())
            self.in_flight.grown.wait(GAUGE_SECONDS)

    def stop(self, timeout_seconds: float = 10.0) -> None:
        """Stop the thread and remove the figure (a clean exit leaves no posts in flight)."""
        super().stop(timeout_seconds)
        try:
            self.redis.hdel(keys.POSTS_IN_FLIGHT, self.worker)
        except RedisError as error:
            log.warning("in-flight gauge: could not remove the figure (%s)", error)
