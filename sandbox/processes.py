"""Stopping child processes the one way this project does it: SIGTERM, then SIGKILL.

SIGTERM gives a Celery worker its warm shutdown (finish or hand back what it holds) and any other
child the chance to exit cleanly; whatever is still running after the grace period is killed.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterable


def stop_processes(
    processes: Iterable[subprocess.Popen[bytes] | None], grace_seconds: float = 30.0
) -> None:
    """Send SIGTERM to every running process, then wait; kill those still running after the
    grace period (each waits at most ``grace_seconds``; all are signalled first, so they stop
    side by side)."""
    running = [p for p in processes if p is not None and p.poll() is None]
    for process in running:
        process.terminate()
    for process in running:
        try:
            process.wait(timeout=grace_seconds)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
