"""CPU per POST of HTTP clients, keep-alive, against the sandbox in its own process.

    .venv/bin/python bench/http_cpu.py [--posts 20000] [--before REF]

Each client sends the same small v4 POST from 16 threads (ours: each thread hands batches of 20
to the one libcurl engine, as a worker does); the figure is this process's CPU time (user +
system) per post, so the sandbox's own CPU is not in it. ``--before REF`` adds the hand-written
transport of that git revision (``worker/concur/transport.py`` ``PooledTransport``) for comparison.
It prints figures and asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.run import module_at  # noqa: E402
from sandbox.redisserver import free_port  # noqa: E402
from worker.concur.transport import Answer, CurlTransport, Exchange, ExchangeFailed  # noqa: E402

THREADS = 16
TOKEN = "bench-token"
BODY = json.dumps(
    {"sessionId": "s", "templateId": "t", "context": {"url": "https://app.example.com/x"}}
).encode()
HEADERS = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}


def _cpu_per_post(posts: int, run: Callable[[int], None]) -> float:
    """Microseconds of this process's CPU per post, ``run(n)`` sending n posts per thread."""
    per_thread = posts // THREADS
    threads = [threading.Thread(target=run, args=(per_thread,)) for _ in range(THREADS)]
    started = time.process_time()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return 1e6 * (time.process_time() - started) / (per_thread * THREADS)


def ours(url: str, posts: int) -> float:
    engine = CurlTransport(THREADS * 20)
    exchange = Exchange(
        "POST", url, tuple(f"{k}: {v}" for k, v in HEADERS.items()), BODY, 30.0, 5.0
    )

    def run(count: int) -> None:
        results: queue.SimpleQueue[Answer | ExchangeFailed] = queue.SimpleQueue()
        for start in range(0, count, 20):
            batch = min(20, count - start)
            engine.submit([(exchange, results.put)] * batch)
            for _ in range(batch):
                result = results.get()
                assert isinstance(result, Answer) and result.status == 200, result

    engine.request(exchange)  # connect before the clock starts
    try:
        return _cpu_per_post(posts, run)
    finally:
        engine.close()


def httpx_transport(url: str, posts: int, transport: httpx.BaseTransport) -> float:
    with httpx.Client(transport=transport, timeout=30) as client:

        def run(count: int) -> None:
            for _ in range(count):
                assert client.post(url, content=BODY, headers=HEADERS).status_code == 200

        client.post(url, content=BODY, headers=HEADERS)
        return _cpu_per_post(posts, run)


def before_transport(ref: str) -> httpx.BaseTransport:
    """``PooledTransport`` from ``worker/concur/transport.py`` at ``ref``, loaded from git."""
    module = module_at(ref, "worker/concur/transport.py", "before_transport")
    return module.PooledTransport(THREADS)  # type: ignore[no-any-return]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--posts", type=int, default=20_000)
    parser.add_argument("--before", default=None, metavar="REF")
    args = parser.parse_args()
    port = free_port()
    sandbox = subprocess.Popen(
        [sys.executable, "-m", "sandbox.concur", "--port", str(port), "--token", TOKEN],
        cwd=ROOT,
        stdout=subprocess.PIPE,
    )
    assert sandbox.stdout is not None
    sandbox.stdout.readline()
    url = f"http://127.0.0.1:{port}/notifications/v4/messages/u1/session"
    rows = {}
    try:
        rows["libcurl engine (ours)"] = ours(url, args.posts)
        rows["httpx.HTTPTransport"] = httpx_transport(
            url, args.posts, httpx.HTTPTransport(limits=httpx.Limits(max_connections=THREADS))
        )
        if args.before:
            rows[f"PooledTransport ({args.before})"] = httpx_transport(
                url, args.posts, before_transport(args.before)
            )
    finally:
        sandbox.terminate()
        sandbox.wait(timeout=10)
    print(f"CPU per POST, {THREADS} threads, keep-alive, {args.posts:,} posts each:")
    for name, micros in rows.items():
        print(f"  {name:<32} {micros:7.1f} us")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
