"""The one way a message reaches the queue: a background thread that publishes in batches.

Everything that queues a message (``enqueue`` and ``enqueue_many``, the mover's due retries,
replays, a warm shutdown's hand-back) calls ``Publisher.submit`` and nothing else sends a task,
so one place batches, retries and logs. Why a thread: publishing a Celery task (message,
"task-sent" event, broker round trips) cost the HTTP gateway more than everything else it does
per request (measured with py-spy). A submitted message is already recorded in Redis, and on the
schedule, before it reaches this queue, so the caller can answer "queued" at once; the thread
publishes whatever has gathered meanwhile as tasks of up to ``batch_size`` messages, waiting at
most ``LINGER_SECONDS`` for a batch to gather.

When the broker does not answer, the messages are kept and published again (every 0.5 s, backing
off to 5 s), so a message recorded while the broker was away reaches the queue within seconds of
its return, not after the publish grace period. Up to ``MAX_HELD`` messages are kept this way;
past that, and if the process dies before a message is published, nothing is lost either: its
schedule entry hands it out after the publish grace period (the broker's visibility timeout).
``flush`` waits until everything submitted before it is on the queue: the mover uses it to stop
taking due messages from the schedule while the broker is away.
"""

from __future__ import annotations

import atexit
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence

from worker.queue.envelopes import Envelope

log = logging.getLogger("notify.publisher")

LINGER_SECONDS = 0.002
RETRY_FIRST_SECONDS = 0.5
RETRY_MAX_SECONDS = 5.0
MAX_HELD = 100_000

_Item = Sequence[Envelope] | threading.Event


class Publisher:
    """Publishes submitted envelopes from a daemon thread, in batches of ``batch_size``.

    ``send`` is the one function that puts a task on the broker, one batch of at most
    ``batch_size`` envelopes per call (``Runtime`` gives its own); it raises when the broker
    does not take it.
    """

    def __init__(self, send: Callable[[list[Envelope]], None], batch_size: int) -> None:
        self._send = send
        self._batch_size = batch_size
        self._queue: queue.SimpleQueue[_Item] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def submit(self, envelopes: Sequence[Envelope]) -> None:
        """Queue ``envelopes`` for publishing; returns at once."""
        if not envelopes:
            return
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    self._thread = threading.Thread(
                        target=self._run, name="notify-publisher", daemon=True
                    )
                    self._thread.start()
                    # A script that enqueues and exits still gets its messages published.
                    atexit.register(self.flush)
        self._queue.put(envelopes)

    def flush(self, timeout_seconds: float = 10.0) -> bool:
        """Wait until everything submitted so far is on the queue; False on timeout.

        Messages still held when it times out stay held and are published on a later try.
        """
        if self._thread is None:
            return True
        done = threading.Event()
        self._queue.put(done)
        return done.wait(timeout_seconds)

    def _run(self) -> None:
        held: list[Envelope] = []  # sent without success; tried again after ``pause``
        waiting: list[threading.Event] = []  # flushes that wait for ``held`` to go out
        pause = RETRY_FIRST_SECONDS
        while True:
            try:
                item: _Item | None = self._queue.get(timeout=pause if held else None)
            except queue.Empty:
                item = None
            batch, markers = self._gather(item) if item is not None else ([], [])
            waiting += markers
            held = self._send_all(held + batch, pause)
            if held:
                pause = min(pause * 2, RETRY_MAX_SECONDS)
                continue
            pause = RETRY_FIRST_SECONDS
            for marker in waiting:
                marker.set()
            waiting = []

    def _send_all(self, envelopes: list[Envelope], pause: float) -> list[Envelope]:
        """Send ``envelopes`` in batches; returns those the broker did not take."""
        for start in range(0, len(envelopes), self._batch_size):
            try:
                self._send(envelopes[start : start + self._batch_size])
            except Exception as error:
                held = envelopes[start:]
                if len(held) > MAX_HELD:
                    log.error(
                        "%d messages are waiting for the broker; %d of them are left to the "
                        "schedule, which publishes them after the grace period",
                        len(held),
                        len(held) - MAX_HELD,
                    )
                    held = held[-MAX_HELD:]
                log.warning(
                    "publishing %d messages failed (%s: %s); trying again in %.1fs",
                    len(held),
                    type(error).__name__,
                    error,
                    pause,
                )
                return held
        return []

    def _gather(self, item: _Item) -> tuple[list[Envelope], list[threading.Event]]:
        deadline = time.monotonic() + LINGER_SECONDS
        batch: list[Envelope] = []
        markers: list[threading.Event] = []
        while True:
            if isinstance(item, threading.Event):
                markers.append(item)
            else:
                batch += item
            if len(batch) >= self._batch_size:
                return batch, markers
            try:
                # A moment's linger, counted from the batch's first message, lets a burst
                # gather into one task; no message waits longer than LINGER_SECONDS.
                item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return batch, markers
