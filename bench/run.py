"""The benchmark: our pipeline against the baseline a user would otherwise write, one table.

    .venv/bin/python bench/run.py            # or: make bench

Starts the sandbox (a separate process, 20 ms latency, keep-alive), uses the Redis that answers
(its own database number) or starts one, and runs the worker fleet as production does (threads
pool, concurrency and processes from flags, task events on). Scenarios:

  drain     N messages queued first, then the workers started; time until the sandbox counted N
  baseline  the same drain with bench/baseline.py (plain Celery task, shared httpx.Client,
            autoretry_for) on a --pool threads worker
  steady    a producer paces R messages/s for T seconds; enqueue→delivered latency percentiles
  gateway   HTTP ingestion through `notify api` with a load generator in another process
  backlog   100k messages waiting for retry: worker RSS and Redis memory per message

It prints figures; it asserts nothing (targets are read against the table, not enforced).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from worker.processes import stop_processes  # noqa: E402
from worker.redisserver import EmbeddedRedis, free_port, redis_answers  # noqa: E402

TOKEN = "bench-token"
TEMPLATE = "bench"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Row:
    """One line of the result table."""

    name: str
    figures: dict[str, Any] = field(default_factory=dict)


def _proc_cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def _proc_memory_mb(pid: int, field: str) -> float:
    """A memory figure of /proc/PID/status in MB: ``VmRSS`` now, ``VmHWM`` its peak."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class Fleet:
    """Worker processes started with one command line, measured from /proc."""

    def __init__(self, command: list[str], env: dict[str, str], processes: int) -> None:
        self.command = command
        self.env = env
        self.count = processes
        self.children: list[subprocess.Popen[bytes]] = []
        self.cpu_seconds = 0.0
        self.peak_rss_mb: list[float] = []

    def start(self) -> None:
        for number in range(self.count):
            self.children.append(
                subprocess.Popen(
                    [*self.command, "--hostname", f"bench{number}-{uuid.uuid4().hex[:4]}@%h"],
                    cwd=ROOT,
                    env=self.env,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )

    def sample(self) -> None:
        self.cpu_seconds = sum(_proc_cpu_seconds(c.pid) for c in self.children)
        self.peak_rss_mb = [_proc_memory_mb(c.pid, "VmHWM") for c in self.children]

    def stop(self) -> None:
        self.sample()
        stop_processes(self.children)
        self.children = []


class Sandbox:
    """The sandbox in its own process, so its CPU is not the benchmark driver's."""

    def __init__(self, latency_ms: float) -> None:
        self.port = free_port()
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "worker.sandbox",
                "--port",
                str(self.port),
                "--latency-ms",
                str(latency_ms),
                "--token",
                TOKEN,
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
        )
        assert self.process.stdout is not None
        self.process.stdout.readline()  # "sandbox listening on ..."
        self.root = f"http://127.0.0.1:{self.port}"
        self.url = f"{self.root}/notifications/v4"
        self.http = httpx.Client(timeout=30)

    def stats(self) -> dict[str, Any]:
        return dict(self.http.get(f"{self.root}/_sandbox/stats").json())

    def reset(self) -> None:
        self.http.post(f"{self.root}/_sandbox/reset")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)


def wait_delivered(sandbox: Sandbox, count: int, timeout: float) -> tuple[float, float]:
    """Poll until the sandbox counted ``count`` 2xx; returns (first progress, done) times."""
    first = None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        delivered = sandbox.stats()["delivered"]
        now = time.monotonic()
        if delivered and first is None:
            first = now
        if delivered >= count:
            return first or now, now
        time.sleep(0.05)
    raise SystemExit(f"timed out: the sandbox counted {sandbox.stats()['delivered']} of {count}")


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--processes", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--steady-rate", type=int, default=500)
    parser.add_argument("--steady-seconds", type=int, default=20)
    parser.add_argument("--backlog", type=int, default=100_000)
    parser.add_argument("--api-workers", type=int, default=2, help="`notify api --workers`")
    parser.add_argument("--connections", type=int, default=32, help="gateway load connections")
    parser.add_argument(
        "--only",
        default="drain,baseline,steady,gateway,backlog",
        help="comma-separated scenarios to run",
    )
    args = parser.parse_args()
    only = set(args.only.split(","))

    embedded = None
    if redis_answers("redis://127.0.0.1:6379/0"):
        redis_url = "redis://127.0.0.1:6379/12"
    else:
        embedded = EmbeddedRedis()
        redis_url = embedded.start()
    from redis import Redis

    redis = Redis.from_url(redis_url, decode_responses=True)
    redis.flushdb()
    sandbox = Sandbox(args.latency_ms)

    env = {
        **os.environ,
        "NOTIFY_REDIS_URL": redis_url,
        "NOTIFY_API_BASE_URL": sandbox.url,
        "NOTIFY_API_TOKEN": TOKEN,
        "NOTIFY_QUEUE_NAME": "bench",
        "NOTIFY_ALLOWED_TEMPLATES": TEMPLATE,
        "NOTIFY_ALLOWED_URL_DOMAINS": "app.example.com",
        "NOTIFY_WORKER_CONCURRENCY": str(args.concurrency),
        "NOTIFY_HTTP_MAX_CONNECTIONS": str(args.concurrency),
        "BASELINE_REDIS_URL": redis_url,
        "BASELINE_API_URL": sandbox.url,
        "BASELINE_TOKEN": TOKEN,
        "PYTHONPATH": str(ROOT),
    }
    os.environ.update({k: v for k, v in env.items() if k.startswith("NOTIFY_")})
    import tasks
    from worker.runtime import get_runtime

    runtime = get_runtime()
    ours_cmd = [sys.executable, "-m", "celery", "-A", "worker", "worker", "--loglevel", "INFO"]
    rows: list[Row] = []
    ours_rate = baseline_rate = None
    n = args.messages
    url = "https://app.example.com/reports/1"

    try:
        if "drain" in only:
            run = uuid.uuid4().hex[:6]
            started = time.perf_counter()
            for start in range(0, n, 1000):
                tasks.enqueue_many(
                    [
                        (f"u{run}-{i}", f"s{i}", TEMPLATE, url)
                        for i in range(start, min(n, start + 1000))
                    ]
                )
            batch_rate = n / (time.perf_counter() - started)
            sample = 5000  # enough single calls that one slow moment does not decide the figure
            started = time.perf_counter()
            for i in range(sample):
                tasks.enqueue(f"single{run}-{i}", f"s{i}", TEMPLATE, url)
            single_rate = sample / (time.perf_counter() - started)
            sandbox.reset()
            fleet = Fleet(ours_cmd, env, args.processes)
            fleet.start()
            first, done = wait_delivered(sandbox, n + sample, timeout=600)
            fleet.stop()
            ours_rate = (n + sample) / (done - first)
            rows.append(
                Row(
                    "drain (ours)",
                    {
                        "delivered/s": ours_rate,
                        "enqueue/s single": single_rate,
                        "enqueue/s batch": batch_rate,
                        "peak RSS MB/worker": max(fleet.peak_rss_mb),
                        "CPU ms/msg": 1000 * fleet.cpu_seconds / (n + sample),
                    },
                )
            )

        if "baseline" in only:
            sys.path.insert(0, str(ROOT / "bench"))
            os.environ.update({k: v for k, v in env.items() if k.startswith("BASELINE_")})
            import baseline

            run = uuid.uuid4().hex[:6]
            started = time.perf_counter()
            with baseline.app.producer_or_acquire() as producer:
                for i in range(n):
                    baseline.send.apply_async(
                        (f"b{run}-{i}", f"s{i}", TEMPLATE, url), producer=producer
                    )
            enqueue_rate = n / (time.perf_counter() - started)
            sandbox.reset()
            fleet = Fleet(
                [
                    sys.executable,
                    "-m",
                    "celery",
                    "-A",
                    "baseline",
                    "worker",
                    "--pool",
                    "threads",
                    "--concurrency",
                    str(args.concurrency),
                    "--loglevel",
                    "INFO",
                    "--queues",
                    "baseline",
                ],
                {**env, "PYTHONPATH": f"{ROOT / 'bench'}:{ROOT}"},
                args.processes,
            )
            fleet.start()
            first, done = wait_delivered(sandbox, n, timeout=600)
            fleet.stop()
            baseline_rate = n / (done - first)
            rows.append(
                Row(
                    "drain (baseline)",
                    {
                        "delivered/s": baseline_rate,
                        "enqueue/s single": enqueue_rate,
                        "peak RSS MB/worker": max(fleet.peak_rss_mb),
                        "CPU ms/msg": 1000 * fleet.cpu_seconds / n,
                    },
                )
            )

        if "steady" in only:
            fleet = Fleet(ours_cmd, env, args.processes)
            fleet.start()
            time.sleep(3)  # let the workers connect before the clock starts
            sandbox.reset()
            run = uuid.uuid4().hex[:6]
            ids = []
            total = args.steady_rate * args.steady_seconds
            started = time.perf_counter()
            for i in range(total):
                due = started + i / args.steady_rate
                pause = due - time.perf_counter()
                if pause > 0:
                    time.sleep(pause)
                ids.append(tasks.enqueue(f"st{run}-{i}", f"s{i}", TEMPLATE, url))
            achieved = total / (time.perf_counter() - started)
            wait_delivered(sandbox, total, timeout=120)
            fleet.stop()
            pipe = runtime.redis.pipeline(transaction=False)
            for message_id in ids:
                pipe.hmget(f"notify:msg:{message_id}", "created", "updated")
            latencies = [int(u) - int(c) for c, u in pipe.execute()]
            rows.append(
                Row(
                    f"steady {args.steady_rate}/s",
                    {
                        "offered/s": achieved,
                        "p50 ms": percentile(latencies, 0.50),
                        "p95 ms": percentile(latencies, 0.95),
                        "p99 ms": percentile(latencies, 0.99),
                        "CPU ms/msg": 1000 * fleet.cpu_seconds / total,
                    },
                )
            )

        if "gateway" in only:
            rows.append(gateway_scenario(env, sandbox, args.api_workers, args.connections))

        if "backlog" in only:
            rows.append(backlog_scenario(runtime, ours_cmd, env, args.backlog))
    finally:
        sandbox.stop()
        if embedded is not None:
            embedded.stop()

    print()
    print(
        f"machine: {os.cpu_count()} cores; sandbox latency {args.latency_ms:g} ms; "
        f"{args.processes} worker processes x {args.concurrency} threads; events on"
    )
    for row in rows:
        cells = ", ".join(
            f"{key} {value:,.1f}" if isinstance(value, float) else f"{key} {value}"
            for key, value in row.figures.items()
        )
        print(f"  {row.name:<20} {cells}")
    if ours_rate and baseline_rate:
        print(f"  ratio ours/baseline  {ours_rate / baseline_rate:.2f}x")
    return 0


def gateway_scenario(
    env: dict[str, str], sandbox: Sandbox, api_workers: int, connections: int
) -> Row:
    """HTTP ingestion through `notify api`, load from bench/load.py in another process."""
    if not (ROOT / "worker" / "api.py").exists():
        return Row("gateway", {"skipped": "no HTTP service"})
    port = free_port()
    key = "bench-partner-key-0001"
    api_env = {**env, "NOTIFY_GATEWAY_KEYS": key, "NOTIFY_OPERATOR_KEYS": "bench-operator-key-0001"}
    server = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "notify"),
            "api",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            str(api_workers),
        ],
        cwd=ROOT,
        env=api_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{base}/healthz").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        result = subprocess.run(
            [
                sys.executable,
                str(ROOT / "bench" / "load.py"),
                "--url",
                base,
                "--key",
                key,
                "--seconds",
                "10",
                "--connections",
                str(connections),
                "--template",
                TEMPLATE,
            ],
            capture_output=True,
            text=True,
            env=api_env,
            timeout=120,
        )
        figures = json.loads(result.stdout.strip().splitlines()[-1])
        return Row(f"gateway {api_workers}p/{connections}c", figures)
    finally:
        server.terminate()
        server.wait(timeout=15)


def backlog_scenario(runtime: Any, command: list[str], env: dict[str, str], count: int) -> Row:
    """Seed ``count`` messages waiting for retry through the workers' own scripts; measure."""
    from worker.records import AttemptRecord, now_ms

    redis = runtime.redis
    store = runtime.store
    redis.flushdb()
    before = int(redis.info("memory")["used_memory"])
    due = now_ms() + 3_600_000
    run = uuid.uuid4().hex[:6]
    from concurrent.futures import ThreadPoolExecutor

    from worker.records import Envelope

    def wait_for_retry(message_id: str, request: dict[str, Any]) -> None:
        # What a worker does when the API answers 503: claim, then schedule the retry.
        claim = store.claim(
            Envelope(message_id, 1, request), owner="o", worker="bench", task_id="t"
        )
        attempt = AttemptRecord(1, now_ms(), "retry", 503, "http_503", 20, "cid-" + message_id)
        store.retry(message_id, "o", due, attempt)
        assert claim.verdict == "go"

    with ThreadPoolExecutor(16) as pool:
        for start in range(0, count, 2000):
            items = [
                (
                    f"bk{run}{i}",
                    {
                        "userId": f"u{i}",
                        "sessionId": f"s{i}",
                        "templateId": TEMPLATE,
                        "context": {"url": "https://app.example.com/reports/1"},
                    },
                )
                for i in range(start, min(count, start + 2000))
            ]
            store.create_many(items)
            list(pool.map(lambda item: wait_for_retry(*item), items))
    used = int(redis.info("memory")["used_memory"]) - before
    waiting = redis.zcard("notify:schedule")
    fleet = Fleet(command, env, 1)
    fleet.start()
    time.sleep(15)  # the mover polls the schedule meanwhile
    rss = _proc_memory_mb(fleet.children[0].pid, "VmRSS")
    fleet.stop()
    return Row(
        f"backlog {count:,}",
        {
            "waiting": waiting,
            "worker RSS MB": rss,
            "Redis bytes/msg": used / count,
        },
    )


if __name__ == "__main__":
    raise SystemExit(main())
