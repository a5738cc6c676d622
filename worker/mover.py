"""The mover: publishes messages whose next attempt is due (retries, and lost tasks).

Each worker process runs one in a thread; the ``due`` script is atomic, so any number of movers
share the schedule without publishing a message twice in one grace period (and a second copy
would be fenced off by ``claim`` anyway).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from worker.records import Envelope, MessageStore

log = logging.getLogger("notify.mover")

BATCH = 500
MAX_PAUSE_SECONDS = 10.0


class Mover:
    """Moves due messages from the schedule to the queue, every ``interval_seconds``."""

    def __init__(
        self,
        store: MessageStore,
        publish: Callable[[list[Envelope]], None],
        interval_seconds: float,
    ) -> None:
        self.store = store
        self.publish = publish
        self.interval_seconds = interval_seconds
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def run_once(self) -> int:
        """Publish every message due now; returns how many were published."""
        moved = 0
        while True:
            batch = self.store.due(BATCH)
            if batch:
                self.publish(batch)
            moved += len(batch)
            if len(batch) < BATCH:
                return moved

    def _loop(self) -> None:
        pause = self.interval_seconds
        while not self._stop.is_set():
            try:
                moved = self.run_once()
                if moved:
                    log.info("mover published %d due messages", moved)
                pause = self.interval_seconds
            except (RedisConnectionError, RedisTimeoutError) as error:
                # An outage is expected to pass: one short line per try, trying less often.
                log.warning("mover: Redis unavailable (%s); next try in %.1fs", error, pause)
                pause = min(pause * 2, MAX_PAUSE_SECONDS)
            except Exception:  # a bug must not end the thread either; it is reported in full
                log.exception("mover tick failed")
            self._stop.wait(pause)

    def start(self) -> None:
        """Run in a daemon thread until ``stop``."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="notify-mover", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop the thread and wait for it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
