"""The gateway's intake: accepted requests are recorded in Redis in groups, one round trip each.

Why: handing every request to a thread pool for its own Redis round trip cost the gateway more
CPU than the request's own work (a thread wake-up, an event-loop wake-up and a round trip each;
measured with py-spy). Here one thread records whatever has gathered while the previous group
was in Redis, as a group commit does, and wakes the event loop once per group. Nothing waits on
purpose: a lone request is recorded at once, and groups only form under load.

Each request still gets its own answer (created, the state of the earlier duplicate, or the
exception that refused it: a company unknown or disconnected), and a Redis failure fails
exactly the requests of that group, which the gateway answers with 503.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Callable, Sequence

from worker.shapes.models import Message

Recorded = tuple[bool, str]  # (created, state), as MessageStore.create answers
# What ``record`` answers per message: recorded, or the exception that refused it alone.
Outcome = Recorded | Exception
_Item = tuple[Message, asyncio.Future[Recorded]]
_Settled = tuple[asyncio.Future[Recorded], Recorded | BaseException]

MAX_GROUP = 64


class Intake:
    """Records messages through ``record`` (one call per group) from a daemon thread."""

    def __init__(
        self,
        record: Callable[[Sequence[Message]], Sequence[Outcome]],
        max_group: int = MAX_GROUP,
    ) -> None:
        self._record = record
        self._max_group = max_group
        self._queue: queue.SimpleQueue[_Item] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    async def record(self, message: Message) -> Recorded:
        """Record ``message`` (and queue it for publishing if new); its (created, state).

        Raises what ``record`` answered for it instead, when that is an exception."""
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    self._thread = threading.Thread(
                        target=self._run, name="notify-intake", daemon=True
                    )
                    self._thread.start()
        future: asyncio.Future[Recorded] = asyncio.get_running_loop().create_future()
        self._queue.put((message, future))
        return await future

    def _run(self) -> None:
        while True:
            group = [self._queue.get()]
            while len(group) < self._max_group:
                try:
                    group.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            outcomes: list[Recorded | BaseException]
            try:
                outcomes = list(self._record([message for message, _ in group]))
                if len(outcomes) != len(group):
                    # Checked here, not left to zip() below: an error raised outside this try
                    # would end the thread, and every request after it would wait forever.
                    raise RuntimeError(f"recorded {len(outcomes)} of {len(group)} messages")
            except Exception as error:  # each waiting request answers for itself (503 or 500)
                outcomes = [error] * len(group)
            by_loop: dict[asyncio.AbstractEventLoop, list[_Settled]] = {}
            for (_, future), outcome in zip(group, outcomes, strict=True):
                by_loop.setdefault(future.get_loop(), []).append((future, outcome))
            for loop, settled in by_loop.items():
                # A closed loop raises RuntimeError: nobody is waiting there any more.
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(_settle, settled)


def _settle(settled: list[_Settled]) -> None:
    for future, outcome in settled:
        if future.done():  # the request was cancelled (client gone); the record stands
            continue
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)
