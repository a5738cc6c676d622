"""CPU per message the history writer costs: its thread and its PostgreSQL backend.

    .venv/bin/python bench/history_cpu.py --redis URL --postgres URL [--entries 20000]
        [--runs 2] [--before REF] [--database hist_cpu_probe]

An outbox of ``--entries`` delivered messages (first attempt, as the drain's: one entry each,
seeded through the workers' own scripts) is made once and copied back before each run; each run
writes it with one ``HistoryWriter`` in this thread into a fresh database (``--database`` on
``--postgres``'s server, dropped at the end). The figures: this thread's CPU
(``time.thread_time``) and the writer's backend's (``/proc/<pid>/stat``; PostgreSQL on this
machine) per message. ``--before REF`` adds that git revision's worker/store/history.py, run in
turn with this tree's (before, now, before, now, ...). It prints figures and asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from types import ModuleType

import psycopg
from redis import Redis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.run import _delivered_many, _redis_cpu_seconds, module_at  # noqa: E402
from worker.store import history, keys  # noqa: E402
from worker.store.records import MessageStore  # noqa: E402

SAVED = "bench:history_cpu:outbox"
TICKS = os.sysconf("SC_CLK_TCK")


def _backend_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def _run(
    module: ModuleType, redis: Redis, server: str, database: str, batch_size: int
) -> tuple[float, float, float, int]:
    """(writer ms/msg, backend ms/msg, Redis ms/msg, messages) of one run of ``module``'s
    writer taking ``batch_size`` entries a read."""
    with psycopg.connect(server, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        admin.execute(f'CREATE DATABASE "{database}"')
    url = server.rsplit("/", 1)[0] + "/" + database
    module.upgrade(url)
    redis.delete(keys.HISTORY_OUTBOX)
    redis.copy(SAVED, keys.HISTORY_OUTBOX)
    entries = int(redis.xlen(keys.HISTORY_OUTBOX))
    writer = module.HistoryWriter(redis, url, consumer="cpu", batch_size=batch_size, block_ms=10)
    writer._group()
    conn = writer._connection()
    writer._maybe_prune(conn)
    [(pid,)] = conn.execute("SELECT pg_backend_pid()").fetchall()
    conn.commit()
    backend, thread, served = _backend_cpu(pid), time.thread_time(), _redis_cpu_seconds(redis)
    writer.drain(timeout=600)
    thread, backend = time.thread_time() - thread, _backend_cpu(pid) - backend
    served = _redis_cpu_seconds(redis) - served
    writer._close()
    with psycopg.connect(url) as check:
        [(outcomes,)] = check.execute("SELECT count(*) FROM notify_outcomes").fetchall()
    assert outcomes == entries, (outcomes, entries)
    return thread * 1000 / entries, backend * 1000 / entries, served * 1000 / entries, entries


def main() -> None:
    """Seed once, run the writers in turn, print a line per run and the medians."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--redis", required=True)
    parser.add_argument("--postgres", required=True)
    parser.add_argument("--entries", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--before", default=None)
    parser.add_argument("--database", default="hist_cpu_probe")
    parser.add_argument(
        "--batch-sizes",
        default="1000",
        help="entries a read (NOTIFY_HISTORY_BATCH_SIZE), comma-separated: each is a side",
    )
    args = parser.parse_args()
    redis = Redis.from_url(args.redis, decode_responses=True)
    redis.flushdb()
    store = MessageStore(
        redis, publish_grace_seconds=3600, lease_seconds=60, status_ttl_seconds=86400, history=True
    )
    _delivered_many(store, args.entries, "c")
    redis.copy(keys.HISTORY_OUTBOX, SAVED)
    sizes = [int(size) for size in args.batch_sizes.split(",")]
    sides: list[tuple[str, ModuleType, int]] = [
        (f"now/{size}" if len(sizes) > 1 else "now", history, size) for size in sizes
    ]
    if args.before:
        before = module_at(args.before, "worker/store/history.py", "history_before")
        sides.insert(0, (args.before, before, sizes[-1]))
    figures: dict[str, list[tuple[float, float, float]]] = {name: [] for name, _, _ in sides}
    try:
        for round_ in range(args.runs):
            for name, module, size in sides if round_ % 2 == 0 else reversed(sides):
                writer_ms, backend_ms, redis_ms, n = _run(
                    module, redis, args.postgres, args.database, size
                )
                figures[name].append((writer_ms, backend_ms, redis_ms))
                load = os.getloadavg()[0]
                print(
                    f"{name:>10} run {round_ + 1}: writer {writer_ms:.4f} ms/msg, backend"
                    f" {backend_ms:.4f} ms/msg, Redis {redis_ms:.4f} ms/msg, total"
                    f" {writer_ms + backend_ms + redis_ms:.4f} ({n} messages, load {load:.1f})",
                    flush=True,
                )
    finally:
        with psycopg.connect(args.postgres, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{args.database}" WITH (FORCE)')
        redis.flushdb()
    for name, runs in figures.items():
        writer = statistics.median(w for w, _, _ in runs)
        backend = statistics.median(b for _, b, _ in runs)
        served = statistics.median(r for _, _, r in runs)
        print(
            f"{name:>10} median: writer {writer:.4f}, backend {backend:.4f}, Redis {served:.4f},"
            f" total {writer + backend + served:.4f} ms/msg"
        )


if __name__ == "__main__":
    main()
