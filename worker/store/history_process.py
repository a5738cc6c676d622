"""The history writer in a process of its own, one beside each worker process.

Why not a thread of the worker: the writer's Python (a batch's replies decoded, its rows built,
psycopg's COPY) held the GIL the worker's delivery threads wait for, and on a machine whose CPU
the drain uses up, every millisecond of it came off the drain (docs/performance.md, "the
history's cost in the drain"). In a process of its own, at a lower priority
(``NOTIFY_HISTORY_WRITER_NICE``, 10), it takes the CPU the deliveries leave: the outbox in Redis
holds a burst's entries, and the writer catches up when the burst is over.

The worker starts it when ``NOTIFY_HISTORY_URL`` is set (``spawn``) and stops it on a warm
shutdown; it stops by itself when that worker dies (it watches its parent), and on SIGTERM it
finishes the batch in hand. Entries it read and did not write are taken over by another
writer after ``NOTIFY_HISTORY_CLAIM_IDLE_SECONDS``, as before.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading

from worker.ops.logs import configure_from_settings
from worker.ops.monitoring import init_sentry
from worker.rules.retries import RedisPatience
from worker.settings import Settings, get_settings
from worker.store.history import HistoryWriter, settings_url
from worker.store.redisclient import make_redis

log = logging.getLogger("notify.history")

# How often the writer looks for its worker (a SIGKILLed worker leaves it to the init process).
PARENT_CHECK_SECONDS = 1.0


def spawn(settings: Settings, consumer: str) -> subprocess.Popen[bytes]:
    """Start the writer for this worker process, ``NOTIFY_HISTORY_WRITER_NICE`` below it;
    ``consumer``: its name in the outbox's group."""
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "worker.store.history_process",
            "--consumer",
            consumer,
            "--parent",
            str(os.getpid()),
        ],
        stdin=subprocess.DEVNULL,
    )
    # Reniced from here, at once, rather than by itself once its imports are done: they take a
    # CPU for half a second, which a worker starting on a backlog needs.
    niceness = min(19, os.getpriority(os.PRIO_PROCESS, 0) + settings.history_writer_nice)
    with contextlib.suppress(ProcessLookupError):
        os.setpriority(os.PRIO_PROCESS, process.pid, niceness)
    return process


def stop(process: subprocess.Popen[bytes], timeout_seconds: float = 10.0) -> None:
    """Ask the writer to finish its batch and exit; killed if it takes longer than the timeout."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout_seconds)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def run(settings: Settings, *, consumer: str, parent: int | None) -> None:
    """Write the outbox into PostgreSQL until SIGTERM, or until ``parent`` is gone."""
    url = settings_url(settings)
    if url is None:
        raise SystemExit("NOTIFY_HISTORY_URL is not set: there is no history database")
    writer = HistoryWriter(
        make_redis(
            settings,
            patience=RedisPatience.from_settings(settings),
            client_name=f"notify-history:{consumer}",
        ),
        url,
        consumer=consumer,
        keep_days=settings.history_days,
        batch_size=settings.history_batch_size,
        claim_idle_seconds=settings.history_claim_idle_seconds,
    )
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    writer.start()
    while not done.wait(PARENT_CHECK_SECONDS):
        if parent is not None and os.getppid() != parent:
            log.warning("history writer: its worker (pid %d) is gone; stopping", parent)
            break
    writer.stop()


def main(argv: list[str] | None = None) -> None:
    """``python -m worker.store.history_process``: the writer beside a worker (``spawn``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--consumer", required=True, help="its name in the outbox's group")
    parser.add_argument("--parent", type=int, help="the worker's pid: stop when it is gone")
    args = parser.parse_args(argv)
    settings = get_settings()
    configure_from_settings(settings)
    init_sentry(settings)
    run(settings, consumer=args.consumer, parent=args.parent)


if __name__ == "__main__":
    main()
