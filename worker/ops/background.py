"""A worker process's background loops: one daemon thread each, stopped cleanly.

The mover, the liveness heartbeat and the history writer each run one step after another on a
thread of their own until the process stops; each step decides how long to pause before the
next (a short tick, or a longer wait while Redis or PostgreSQL is away). ``Loop`` is that thread,
and each of them is a ``Loop`` with its own ``_step``: a step's error handling stays with the
step, which knows what its errors mean.
"""

from __future__ import annotations

import threading


class Loop:
    """Runs ``_step`` on a daemon thread until ``stop``; ``_step`` returns the pause in seconds."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the thread (once)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()

    def stop(self, timeout_seconds: float = 10.0) -> None:
        """Ask the loop to stop and wait for the step in hand to finish."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_seconds)
            self._thread = None

    def _step(self) -> float:
        raise NotImplementedError

    def _run(self) -> None:
        while not self._stop.is_set():
            self._stop.wait(self._step())
