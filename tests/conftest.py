"""Test harness: a real Redis, the real sandbox on loopback, and real ``celery worker`` processes.

Redis: ``NOTIFY_TEST_REDIS_URL`` if set; else the server on 127.0.0.1:6379 when it answers (a
private database number); else an embedded ``redis-server`` started here. The environment is set
in ``pytest_configure``, before any test imports the app, so the test process and the worker
subprocesses read the same settings.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from sandbox.concur import Sandbox
from sandbox.processes import stop_processes
from sandbox.redisserver import EmbeddedRedis, free_port, redis_answers

ROOT = Path(__file__).resolve().parent.parent
TEST_TOKEN = "test-secret-token-4f1c"
LOCAL_REDIS = "redis://127.0.0.1:6379"

ALLOWED_TEMPLATES = "welcome,expense-approved,t-retry,t-dead"
ALLOWED_DOMAINS = "app.example.com,*.partner.example"

_embedded: EmbeddedRedis | None = None
SANDBOX: Sandbox | None = None


def _claim_database() -> str | None:
    # Test runs may overlap on one machine; each takes a database number of its own (a lock key
    # in database 0) so that one run's flush never wipes another's messages.
    from redis import Redis

    lock_client = Redis.from_url(f"{LOCAL_REDIS}/0")
    for number in range(15, 0, -1):
        if lock_client.set(f"notify-test-lock:{number}", os.getpid(), nx=True, ex=3600):
            return f"{LOCAL_REDIS}/{number}"
    return None


def _release_database(url: str) -> None:
    from redis import Redis

    number = url.rsplit("/", 1)[1]
    Redis.from_url(f"{LOCAL_REDIS}/0").delete(f"notify-test-lock:{number}")


def _pick_redis() -> str:
    global _embedded
    explicit = os.environ.get("NOTIFY_TEST_REDIS_URL")
    if explicit:
        return explicit
    if redis_answers(f"{LOCAL_REDIS}/0"):
        claimed = _claim_database()
        if claimed:
            return claimed
    _embedded = EmbeddedRedis()
    return _embedded.start()


def pytest_configure(config: pytest.Config) -> None:
    global SANDBOX
    redis_url = _pick_redis()
    SANDBOX = Sandbox(tokens=[TEST_TOKEN])
    api_url = SANDBOX.start()
    os.environ.update(
        {
            "NOTIFY_REDIS_URL": redis_url,
            "NOTIFY_API_BASE_URL": api_url,
            "NOTIFY_API_TOKEN": TEST_TOKEN,
            "NOTIFY_QUEUE_NAME": f"notify-test-{os.getpid()}",
            "NOTIFY_ALLOWED_TEMPLATES": ALLOWED_TEMPLATES,
            "NOTIFY_ALLOWED_URL_DOMAINS": ALLOWED_DOMAINS,
            "NOTIFY_MAX_ATTEMPTS": "3",
            "NOTIFY_BACKOFF_BASE_SECONDS": "0.3",
            "NOTIFY_BACKOFF_MAX_SECONDS": "1",
            "NOTIFY_HTTP_CONNECT_TIMEOUT_SECONDS": "1",
            "NOTIFY_HTTP_TIMEOUT_SECONDS": "1",
            "NOTIFY_VISIBILITY_TIMEOUT_SECONDS": "30",
            "NOTIFY_RETRY_POLL_INTERVAL_SECONDS": "0.1",
            "NOTIFY_WORKER_CONCURRENCY": "16",
            # The tests script 503s and hangs on purpose, dozens a minute; a breaker shared by
            # the session's workers would pause unrelated tests. tests/test_breaker.py turns it
            # on for workers of its own.
            "NOTIFY_BREAKER_ENABLED": "false",
            # Every test's wrong keys come from 127.0.0.1 into one Redis: the failure limits
            # (worker/front/guard.py) would block unrelated tests. Tests of the limits set
            # their own, on processes of their own.
            "NOTIFY_AUTH_FAILURES_PER_ADDRESS": "1000000",
            "NOTIFY_AUTH_FAILURES_TOTAL": "10000000",
        }
    )
    from redis import Redis

    Redis.from_url(redis_url).flushdb()


def pytest_unconfigure(config: pytest.Config) -> None:
    if SANDBOX is not None:
        SANDBOX.stop()
    if _embedded is not None:
        _embedded.stop()
    elif os.environ.get("NOTIFY_REDIS_URL", "").startswith(
        LOCAL_REDIS + "/"
    ) and not os.environ.get("NOTIFY_TEST_REDIS_URL"):
        _release_database(os.environ["NOTIFY_REDIS_URL"])


@pytest.fixture(scope="session")
def sandbox() -> Sandbox:
    """The loopback stand-in for Concur (shared; tests tell apart their own users)."""
    assert SANDBOX is not None
    return SANDBOX


@pytest.fixture
def user_id() -> str:
    """A user id of this test's own, so the shared sandbox's record can be read per test."""
    return f"user-{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="session")
def runtime() -> Any:
    """The test process's runtime (same settings as the workers)."""
    from worker.runtime import get_runtime

    return get_runtime()


class NotifyApi:
    """``notify api`` in a subprocess (as operators run it) on a port of its own, logging to a
    file; ``env`` on top of the test session's settings."""

    def __init__(self, log_path: Path, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 (closed in stop)
        notify = Path(sys.executable).with_name("notify")
        self.process = subprocess.Popen(
            [str(notify), "api", "--host", "127.0.0.1", "--port", str(self.port)],
            cwd=ROOT,
            env={**os.environ, **(env or {})},
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        wait_for(self.ready, timeout=30, what="notify api to answer")

    def ready(self) -> bool:
        """Whether it answers ``/readyz`` (raises if the process has exited)."""
        if self.process.poll() is not None:
            raise RuntimeError(f"notify api exited:\n{self.log_path.read_text(errors='replace')}")
        try:
            return bool(httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200)
        except httpx.HTTPError:
            return False

    def log(self) -> str:
        """What it has logged so far."""
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        """Stop it (SIGTERM, then SIGKILL after a grace)."""
        stop_processes([self.process], grace_seconds=20)
        self._log.close()


def wait_for(
    condition: Callable[[], Any], timeout: float = 15.0, interval: float = 0.05, what: str = ""
) -> Any:
    """Poll ``condition`` until it returns something truthy; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or condition}")


class WorkerProcess:
    """A real ``celery -A worker worker`` subprocess, logging to a file."""

    def __init__(self, name: str, log_dir: Path, extra_env: dict[str, str] | None = None) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self.extra_env = extra_env or {}
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0, prefix: Sequence[str] = ()) -> WorkerProcess:
        """Start the worker and wait until it is ready; ``prefix`` runs it under another
        command (``ip netns exec NAME``)."""
        env = {**os.environ, **self.extra_env}
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed in stop)
        self.process = subprocess.Popen(
            [
                *prefix,
                sys.executable,
                "-m",
                "celery",
                "-A",
                "worker",
                "worker",
                "--loglevel",
                "INFO",
                "--hostname",
                f"{self.name}@%h",
                "--without-mingle",
                "--without-gossip",
            ],
            cwd=ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        wait_for(
            lambda: self.process.poll() is not None or b" ready." in self.log_path.read_bytes(),
            timeout=timeout,
            what=f"worker {self.name} to be ready",
        )
        if self.process.poll() is not None:
            raise RuntimeError(f"worker {self.name} exited:\n{self.log()}")
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def stop(self, timeout: float = 30.0) -> None:
        stop_processes([self.process], grace_seconds=timeout)
        if getattr(self, "_log", None):
            self._log.close()


@pytest.fixture(scope="session")
def worker_logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("workers")


@pytest.fixture(scope="session")
def celery_worker_process(worker_logs: Path) -> Iterator[WorkerProcess]:
    """One real worker for the whole session (the mover runs inside it)."""
    worker = WorkerProcess("main", worker_logs).start()
    yield worker
    worker.stop()


@pytest.fixture
def start_worker(worker_logs: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """Start extra workers for one test; they are stopped after it."""
    started: list[WorkerProcess] = []

    def start(name: str | None = None, **env: str) -> WorkerProcess:
        worker = WorkerProcess(name or f"w{uuid.uuid4().hex[:6]}", worker_logs, env).start()
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop()


class SentryRecorder:
    """A loopback server in the place of Sentry: keeps every envelope the SDK posts."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.headers.get("Content-Encoding") == "gzip":
                    raw = gzip.decompress(raw)
                recorder.bodies.append(raw)
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.dsn = f"http://public@127.0.0.1:{self.server.server_address[1]}/1"

    def events(self) -> list[dict[str, Any]]:
        """The error events among everything received (not sessions or client reports)."""
        found = []
        for body in list(self.bodies):
            lines = body.split(b"\n")
            index = 1  # line 0 is the envelope header
            while index + 1 < len(lines) and lines[index]:
                header = json.loads(lines[index])
                payload = lines[index + 1]
                if "length" in header:
                    rest = b"\n".join(lines[index + 1 :])
                    payload = rest[: header["length"]]
                    index += 1 + payload.count(b"\n") + 1
                else:
                    index += 2
                if header.get("type") == "event":
                    found.append(json.loads(payload))
        return found

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def sentry() -> Iterator[SentryRecorder]:
    recorder = SentryRecorder()
    yield recorder
    recorder.stop()


__all__ = [
    "TEST_TOKEN",
    "NotifyApi",
    "SentryRecorder",
    "WorkerProcess",
    "free_port",
    "wait_for",
]
