"""Soak test: a steady rate through the HTTP gateway for a set time, with faults on.

    .venv/bin/python bench/soak.py --minutes 10 --rate 20

Starts everything of its own on loopback: a private ``redis-server`` (AOF on, a free port), the
sandbox (answering 30 % 500/503/504 and hanging 2 % past the timeout), two ``celery worker``
processes and ``notify api``. Sends distinct valid requests at ``--rate`` per second for
``--minutes``; halfway it SIGKILLs one worker and starts it again (``--no-kill`` to skip). Then
it waits for every accepted message to finish and prints: accepted, delivered, dead-lettered,
lost (must be 0), duplicated (must be 0), peak worker memory, Redis memory. Exit status 1 when
anything was lost or duplicated.

A message whose 2xx the sandbox gave in the instant before the SIGKILL, and which the worker never
recorded, is posted again after its lease: README's documented at-least-once bound. Such posts are
counted apart ("re-posted after the SIGKILL"), checked by correlation id, not hidden.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sandbox.concur import Sandbox  # noqa: E402
from sandbox.processes import stop_processes  # noqa: E402
from sandbox.redisserver import EmbeddedRedis, free_port  # noqa: E402
from worker.runtime import Runtime  # noqa: E402
from worker.settings import load_settings  # noqa: E402
from worker.shapes.models import BARE_KEY_PARTNER, message_id  # noqa: E402
from worker.store import keys  # noqa: E402

TOKEN = "soak-token-" + uuid.uuid4().hex
GATEWAY_KEY = "soak-gateway-" + uuid.uuid4().hex
FLAPPING = {"errorRatio": 0.3, "statuses": [500, 503, 504], "hangRatio": 0.02}
QUEUE = "notify-soak"
URL = "https://app.example.com/soak"


def _env(redis_url: str, api_url: str) -> dict[str, str]:
    return {
        **os.environ,
        "NOTIFY_REDIS_URL": redis_url,
        "NOTIFY_QUEUE_NAME": QUEUE,
        "NOTIFY_API_BASE_URL": api_url,
        "NOTIFY_API_TOKEN": TOKEN,
        "NOTIFY_GATEWAY_KEYS": GATEWAY_KEY,
        "NOTIFY_ALLOWED_TEMPLATES": "soak",
        "NOTIFY_ALLOWED_URL_DOMAINS": "app.example.com",
        "NOTIFY_MAX_ATTEMPTS": "8",
        "NOTIFY_BACKOFF_BASE_SECONDS": "0.5",
        "NOTIFY_BACKOFF_MAX_SECONDS": "5",
        "NOTIFY_HTTP_CONNECT_TIMEOUT_SECONDS": "2",
        "NOTIFY_HTTP_TIMEOUT_SECONDS": "2",
        "NOTIFY_VISIBILITY_TIMEOUT_SECONDS": "30",
        "NOTIFY_RETRY_POLL_INTERVAL_SECONDS": "0.5",
        "NOTIFY_WORKER_CONCURRENCY": "32",
        "NOTIFY_LOG_LEVEL": "WARNING",
    }


class Worker:
    """One ``celery worker`` subprocess, logging to a file."""

    def __init__(self, name: str, env: dict[str, str], log_dir: Path) -> None:
        self.name, self.env, self.log_path = name, env, log_dir / f"{name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        log = open(self.log_path, "ab")  # noqa: SIM115 (the child holds it)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "worker", "worker", "--loglevel", "WARNING",
             "--hostname", f"{self.name}@%h", "--without-mingle", "--without-gossip"],
            cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        log.close()

    def rss_bytes(self) -> int:
        if self.process is None or self.process.poll() is not None:
            return 0
        try:
            for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    def kill(self) -> float:
        assert self.process is not None
        at = time.time()
        self.process.kill()
        self.process.wait(timeout=10)
        return at

    def stop(self) -> None:
        stop_processes([self.process])


async def _send(
    base_url: str, rate: float, seconds: float, on_tick: Any
) -> tuple[list[tuple[str, str]], collections.Counter[int]]:
    """POST distinct requests at ``rate`` per second; returns the accepted (user, session)."""
    run = uuid.uuid4().hex[:8]
    accepted: list[tuple[str, str]] = []
    statuses: collections.Counter[int] = collections.Counter()
    limits = httpx.Limits(max_connections=32, max_keepalive_connections=32)
    headers = {"Authorization": f"Bearer {GATEWAY_KEY}"}
    async with httpx.AsyncClient(base_url=base_url, limits=limits, headers=headers) as client:

        async def one(n: int) -> None:
            user, session = f"soak-{n % 50}", f"{run}-{n}"
            body = {"sessionId": session, "templateId": "soak", "context": {"url": URL}}
            try:
                answer = await client.post(f"/messages/{user}/session", json=body, timeout=30)
                statuses[answer.status_code] += 1
                if answer.status_code == 202:
                    accepted.append((user, session))
            except httpx.HTTPError:
                statuses[0] += 1

        started = time.monotonic()
        pending: set[asyncio.Task[None]] = set()
        total = int(rate * seconds)
        for n in range(total):
            delay = started + n / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(one(n))
            pending.add(task)
            task.add_done_callback(pending.discard)
            on_tick(time.monotonic() - started)
        await asyncio.gather(*pending)
    return accepted, statuses


def _states(runtime: Runtime, ids: list[str]) -> list[str | None]:
    out: list[str | None] = []
    for start in range(0, len(ids), 1000):
        pipe = runtime.redis.pipeline(transaction=False)
        for ident in ids[start : start + 1000]:
            pipe.hget(keys.message(ident), "state")
        out.extend(pipe.execute())
    return out


def _reconcile(
    runtime: Runtime, sandbox: Sandbox, accepted: list[tuple[str, str]], killed: list[float]
) -> dict[str, int]:
    posts: dict[tuple[str, str], list[dict[str, Any]]] = collections.defaultdict(list)
    for record in sandbox.requests():
        status, body = record["status"], record["body"]
        if status is not None and 200 <= status < 300 and isinstance(body, dict):
            posts[(record["userId"], body.get("sessionId"))].append(record)
    counts = collections.Counter[str]()
    for user, session in accepted:
        ident = message_id(user, session, "soak", BARE_KEY_PARTNER)
        record = runtime.store.status(ident) or {}
        state = record.get("state")
        ok = posts.get((user, session), [])
        if state == "delivered" and ok:
            counts["delivered"] += 1
            if len(ok) > 1:
                cids = {a.get("cid") for a in record.get("attempts", [])}
                window = all(
                    # A post the dying worker had sent may reach the sandbox a moment later.
                    p["correlationId"] not in cids and any(p["at"] <= k + 2.0 for k in killed)
                    for p in ok[:-1]
                )
                counts["re-posted after the SIGKILL" if window else "duplicated"] += 1
        elif state == "failed" and not ok:
            counts["dead-lettered"] += 1
            letter = runtime.deadletters.get(ident)
            counts[f"  dead: {letter.reason if letter else '?'}"] += 1
        else:
            counts["lost"] += 1
    return counts


def main() -> int:
    """Run the soak and print its table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=20.0, help="requests per second")
    parser.add_argument("--settle-minutes", type=float, default=5.0)
    parser.add_argument("--no-kill", action="store_true", help="no worker SIGKILL midway")
    args = parser.parse_args()

    log_dir = Path(tempfile.mkdtemp(prefix="notify-soak-"))
    redis = EmbeddedRedis(port=free_port())
    redis_url = redis.start()
    sandbox = Sandbox(tokens=[TOKEN], max_records=2_000_000)
    api_url = sandbox.start()
    sandbox.script(rate=FLAPPING)
    env = _env(redis_url, api_url)
    workers = [Worker(f"soak-{n}", env, log_dir) for n in (1, 2)]
    service_port = free_port()
    service_log = open(log_dir / "api.log", "wb")  # noqa: SIM115
    service = subprocess.Popen(
        [str(Path(sys.executable).with_name("notify")), "api", "--port", str(service_port)],
        cwd=ROOT, env=env, stdout=service_log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    runtime = Runtime.from_settings(load_settings(redis_url=redis_url, queue_name=QUEUE))
    base = f"http://127.0.0.1:{service_port}"
    peak_rss = 0
    killed: list[float] = []
    try:
        for worker in workers:
            worker.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        time.sleep(5)  # the workers' start-up
        seconds = args.minutes * 60
        state = {"next_sample": 0.0}

        def on_tick(elapsed: float) -> None:
            nonlocal peak_rss
            if elapsed >= state["next_sample"]:
                state["next_sample"] = elapsed + 1.0
                peak_rss = max(peak_rss, *(w.rss_bytes() for w in workers))
            if not args.no_kill and not killed and elapsed >= seconds / 2:
                killed.append(workers[0].kill())
                workers[0].start()

        print(f"soak: {args.rate}/s for {args.minutes} min, logs in {log_dir}", flush=True)
        accepted, statuses = asyncio.run(_send(base, args.rate, seconds, on_tick))
        ids = [message_id(u, s, "soak", BARE_KEY_PARTNER) for u, s in accepted]
        settle_deadline = time.monotonic() + args.settle_minutes * 60
        while time.monotonic() < settle_deadline:
            peak_rss = max(peak_rss, *(w.rss_bytes() for w in workers))
            if all(s in ("delivered", "failed") for s in _states(runtime, ids)):
                break
            time.sleep(2)
        counts = _reconcile(runtime, sandbox, accepted, killed)
        memory = runtime.redis.info("memory")
        rows = [
            ("requests sent", sum(statuses.values())),
            ("accepted (202)", len(accepted)),
            ("refused or failed requests", sum(v for k, v in statuses.items() if k != 202)),
            ("delivered", counts["delivered"]),
            ("dead-lettered", counts["dead-lettered"]),
            *sorted((k, v) for k, v in counts.items() if k.startswith("  dead:")),
            ("lost (must be 0)", counts["lost"]),
            ("duplicated (must be 0)", counts["duplicated"]),
            ("re-posted after the SIGKILL", counts["re-posted after the SIGKILL"]),
            ("API posts (all answers)", sandbox.stats()["total"]),
            ("API answers by status", json.dumps(sandbox.stats()["byStatus"])),
            ("API hung requests", sandbox.stats()["hung"]),
            ("worker SIGKILLs", len(killed)),
            ("peak worker memory (RSS)", f"{peak_rss / 2**20:.1f} MiB"),
            ("Redis memory (used / peak)",
             f"{memory['used_memory_human']} / {memory['used_memory_peak_human']}"),
        ]  # fmt: skip
        width = max(len(name) for name, _ in rows)
        print(f"{'what':<{width}}  value")
        for name, value in rows:
            print(f"{name:<{width}}  {value}")
        return 1 if counts["lost"] or counts["duplicated"] else 0
    finally:
        stop_processes([service])
        service_log.close()
        for worker in workers:
            worker.stop()
        runtime.close()
        sandbox.stop()
        redis.stop()


if __name__ == "__main__":
    raise SystemExit(main())
