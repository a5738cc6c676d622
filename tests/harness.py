"""What the test tiers share (not a test module): the services, workers, servers and helpers.

The unit tier (tests/unit) uses none of the services. The integration and faults tiers start
them in their conftest's ``pytest_configure`` (``start_services``), before their test modules
import the app, so the test process and the worker subprocesses read the same settings:

Redis: ``NOTIFY_TEST_REDIS_URL`` if set; else the server on 127.0.0.1:6379 when it answers (a
private database number); else an embedded ``redis-server`` started here. The sandbox (the
loopback stand-in for Concur) runs in a thread of the test process.
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from sandbox.concur import Sandbox
from sandbox.processes import stop_processes
from sandbox.redisserver import (
    EmbeddedRedis,
    claim_database,
    free_port,
    redis_answers,
    release_database,
)

ROOT = Path(__file__).resolve().parent.parent
TEST_TOKEN = "test-secret-token-4f1c"
LOCAL_REDIS = "redis://127.0.0.1:6379"

ALLOWED_TEMPLATES = "welcome,expense-approved,t-retry,t-dead"
ALLOWED_DOMAINS = "app.example.com,*.partner.example"

# Where the unit tier's settings point: ports where nothing answers (the discard port), so a
# "pure" test that reaches for Redis or Concur fails at once instead of using someone's database.
NOWHERE_REDIS = "redis://127.0.0.1:9/0"
NOWHERE_API = "http://127.0.0.1:9/notifications/v4"

# The keys of the HTTP service the tests build (``app_settings``): one of each, for every module.
PARTNER_KEY = "partner-key-" + uuid.uuid4().hex
OTHER_PARTNER_KEY = "partner-key-" + uuid.uuid4().hex
OPERATOR_KEY = "operator-key-" + uuid.uuid4().hex
PARTNER = {"Authorization": f"Bearer {PARTNER_KEY}"}
OPERATOR = {"Authorization": f"Bearer {OPERATOR_KEY}"}
MAX_BODY = 4096


def static_environment() -> dict[str, str]:
    """The settings every tier runs with; ``start_services`` adds Redis and the sandbox."""
    return {
        "NOTIFY_REDIS_URL": NOWHERE_REDIS,
        "NOTIFY_API_BASE_URL": NOWHERE_API,
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
        # The tests script 503s and hangs on purpose, dozens a minute; a breaker shared by the
        # session's workers would pause unrelated tests. tests/integration/test_breaker.py turns
        # it on for workers of its own.
        "NOTIFY_BREAKER_ENABLED": "false",
        # Every test's wrong keys come from 127.0.0.1 into one Redis: the failure limits
        # (worker/front/guard.py) would block unrelated tests. Tests of the limits set their
        # own, on processes of their own.
        "NOTIFY_AUTH_FAILURES_PER_ADDRESS": "1000000",
        "NOTIFY_AUTH_FAILURES_TOTAL": "10000000",
    }


def configure_environment() -> None:
    """Set the tests' settings in the environment: the static ones, and the services' once
    they run (pytest configures the tier conftests before or after the top one; either way)."""
    env = static_environment()
    if _services is not None:
        env["NOTIFY_REDIS_URL"] = _services.redis_url
        env["NOTIFY_API_BASE_URL"] = _services.sandbox.url
    os.environ.update(env)


# -- the services ------------------------------------------------------------------------------


@dataclass
class Services:
    """The Redis database and the sandbox of this test run."""

    redis_url: str
    sandbox: Sandbox
    embedded: EmbeddedRedis | None
    claimed: bool


_services: Services | None = None


def start_services() -> Services:
    """Start Redis (or claim a database) and the sandbox, once per test process, and point the
    environment at them; later calls return the same ones."""
    global _services
    if _services is not None:
        return _services
    if "worker.celery_app" in sys.modules:
        # Its Celery app was built from the unit tier's settings (a broker where nothing
        # answers); a unit test that imports it is not a unit test.
        raise RuntimeError("worker.celery_app was imported before the services started")
    embedded: EmbeddedRedis | None = None
    claimed = False
    redis_url = os.environ.get("NOTIFY_TEST_REDIS_URL") or ""
    if not redis_url and redis_answers(f"{LOCAL_REDIS}/0"):
        redis_url = claim_database() or ""
        claimed = bool(redis_url)
    if not redis_url:
        embedded = EmbeddedRedis()
        redis_url = embedded.start()
    sandbox = Sandbox(tokens=[TEST_TOKEN])
    sandbox.start()
    _services = Services(redis_url, sandbox, embedded, claimed)
    configure_environment()
    from redis import Redis

    from worker.runtime import get_runtime
    from worker.settings import get_settings

    # Whatever read the settings before (a unit test) read the unit tier's.
    get_settings.cache_clear()
    get_runtime.cache_clear()
    Redis.from_url(redis_url).flushdb()
    return _services


def stop_services() -> None:
    """Stop what ``start_services`` started (nothing when it did not run)."""
    global _services
    if _services is None:
        return
    _services.sandbox.stop()
    if _services.embedded is not None:
        _services.embedded.stop()
    if _services.claimed:
        release_database(_services.redis_url)
    _services = None


# -- waiting, workers, servers -----------------------------------------------------------------


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


class ServerThread:
    """A uvicorn server for one app, in a thread, on a free loopback port."""

    def __init__(self, app: Any) -> None:
        self.port = free_port()
        config = uvicorn.Config(
            app, host="127.0.0.1", port=self.port, log_config=None, access_log=True
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ServerThread:
        self.thread.start()
        wait_for(lambda: self.server.started, timeout=15, what="uvicorn to start")
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)


def app_settings(**overrides: Any) -> Any:
    """The HTTP service's settings in the tests: the keys above, a small body limit."""
    from worker.settings import load_settings

    return load_settings(
        gateway_keys=f"{PARTNER_KEY},{OTHER_PARTNER_KEY}",
        operator_keys=OPERATOR_KEY,
        service_max_body_bytes=MAX_BODY,
        **overrides,
    )


def request_body(
    session: str | None = None, template: str = "welcome", url: str | None = None
) -> dict[str, Any]:
    """A valid v4 request body (a fresh session unless one is given)."""
    return {
        "sessionId": session or f"s-{uuid.uuid4().hex[:8]}",
        "templateId": template,
        "context": {"url": url or "https://app.example.com/reports/1"},
    }


def message_keys(runtime: Any) -> int:
    """How many message records the runtime's database holds."""
    from worker.store import keys

    return sum(
        1
        for key in runtime.redis.scan_iter(match=keys.message("*"), count=1000)
        if not key.endswith(":attempts")
    )


def dead_letter(runtime: Any, user: str, **fields: Any) -> str:
    """Write a dead letter with the real store (as a worker would) and return its id; ``fields``
    set the request (session, template, context, partner) and the failure."""
    from worker.shapes.models import message_id
    from worker.store.records import Failure

    session = fields.pop("session", f"s-{uuid.uuid4().hex[:8]}")
    template = fields.pop("template", "welcome")
    context = fields.pop("context", {"url": "https://app.example.com/r/1"})
    partner = fields.pop("partner", None)
    ident = message_id(user, session, template, partner)
    failure = Failure(
        reason=fields.pop("reason", "api_rejected"),
        detail=fields.pop("detail", "the API refused the request"),
        status=fields.pop("status", 400),
        errors=fields.pop("errors", [{"errorId": "e1", "errorCode": "BAD", "errorMessage": "no"}]),
        correlation_id=fields.pop("correlation_id", "cid-" + uuid.uuid4().hex[:8]),
        task_id="task-1",
        worker="test",
    )
    request = {"userId": user, "sessionId": session, "templateId": template, "context": context}
    if partner:
        request["partner"] = partner
    assert runtime.store.dead_letter(ident, failure, request=request)
    return ident


def docker_pins() -> dict[str, str]:
    """docker/requirements.txt as {canonical name: version}; every line a hashed ``==`` pin."""
    from packaging.utils import canonicalize_name

    pins: dict[str, str] = {}
    text = (ROOT / "docker" / "requirements.txt").read_text().replace("\\\n", " ")
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        requirement, *options = line.split()
        name, _, version = requirement.partition("==")
        assert version, f"not pinned: {line}"
        assert options and all(o.startswith("--hash=sha256:") for o in options), f"no hash: {line}"
        pins[canonicalize_name(name)] = version
    return pins


# -- a database and queue of a test's own ------------------------------------------------------

_PRODUCE = """
import json, sys
import tasks
requests = [tuple(r) for r in json.load(sys.stdin)]
print(json.dumps(tasks.enqueue_many(requests)))
"""


class Isolated:
    """Environment overrides for workers and producers, and a runtime to read the outcome.

    The session worker (``celery_worker_process``) stays up once a module has used it, and it
    shares the run's Redis database: it would take messages (and, through its mover, retries)
    from a test that watches one particular worker (Sentry events, Flower, a SIGTERM). Such a
    test runs its workers, and its producer, against a database nobody else uses (the
    ``isolated`` fixture).
    """

    def __init__(self, redis_url: str) -> None:
        from worker.runtime import Runtime
        from worker.settings import load_settings

        self.env = {
            "NOTIFY_REDIS_URL": redis_url,
            "NOTIFY_QUEUE_NAME": f"notify-isolated-{uuid.uuid4().hex[:8]}",
        }
        settings = load_settings(redis_url=redis_url, queue_name=self.env["NOTIFY_QUEUE_NAME"])
        self.runtime = Runtime.from_settings(settings)

    def enqueue_many(self, requests: list[tuple[str, str, str, str | None]]) -> list[str]:
        """Queue messages through ``tasks.enqueue_many`` in a producer process of this database."""
        import json

        done = subprocess.run(
            [sys.executable, "-c", _PRODUCE],
            input=json.dumps(requests),
            env={**os.environ, **self.env},
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        ids: list[str] = json.loads(done.stdout.strip().splitlines()[-1])
        return ids

    def state(self, message_id: str) -> str | None:
        record: dict[str, Any] | None = self.runtime.store.status(message_id)
        return record["state"] if record else None


def another_database() -> tuple[str, bool]:
    """A Redis database nobody else uses, and whether it was claimed (to be released)."""
    current = os.environ["NOTIFY_REDIS_URL"]
    if current.startswith(LOCAL_REDIS + "/") and not os.environ.get("NOTIFY_TEST_REDIS_URL"):
        claimed = claim_database()
        if claimed is None:
            pytest.skip("no free Redis database number for an isolated test")
        return claimed, True
    # A private (embedded) or explicitly given server: take the database eight numbers on.
    base, _, number = current.rpartition("/")
    return f"{base}/{(int(number or 0) + 8) % 16}", False


__all__ = [
    "MAX_BODY",
    "OPERATOR",
    "OPERATOR_KEY",
    "OTHER_PARTNER_KEY",
    "PARTNER",
    "PARTNER_KEY",
    "ROOT",
    "TEST_TOKEN",
    "Isolated",
    "ServerThread",
    "Services",
    "WorkerProcess",
    "another_database",
    "app_settings",
    "claim_database",
    "configure_environment",
    "dead_letter",
    "docker_pins",
    "free_port",
    "message_keys",
    "release_database",
    "request_body",
    "start_services",
    "stop_services",
    "wait_for",
]


# -- processes and stand-ins the HTTP service's tests use ----------------------------------


class NotifyApi:
    """``notify api`` in a subprocess (as operators run it) on a port of its own, logging to a
    file; ``env`` on top of the test session's settings."""

    def __init__(
        self, log_path: Path, env: dict[str, str] | None = None, *, workers: int = 1
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 (closed in stop)
        notify = Path(sys.executable).with_name("notify")
        self.process = subprocess.Popen(
            [str(notify), "api", "--host", "127.0.0.1", "--port", str(self.port)]
            + (["--workers", str(workers)] if workers > 1 else []),
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


# -- Redis Sentinel and network partitions (tests/faults, bench/chaos.py) --------------------------


class SentinelGroup:
    """A Redis master, one replica and three sentinels, listening on ``host`` (and loopback).

    ``host`` other than loopback (a :class:`Namespace`'s ``host_ip``) lets a process in a
    network namespace follow the sentinels: they name the master by that address."""

    MASTER = "notify-ha"

    def __init__(self, directory: Path, host: str = "127.0.0.1") -> None:
        self.directory = directory
        self.host = host
        bind = (
            ["--bind", "127.0.0.1", host, "--protected-mode", "no"] if host != "127.0.0.1" else []
        )
        self.master = EmbeddedRedis(port=free_port(), extra_args=bind)
        self.replica = EmbeddedRedis(
            port=free_port(), extra_args=[*bind, "--replicaof", host, str(self.master.port)]
        )
        self.ports = [free_port() for _ in range(3)]
        self.sentinels: list[subprocess.Popen[bytes]] = []

    @property
    def addresses(self) -> str:
        """The sentinels, as ``NOTIFY_REDIS_SENTINELS`` takes them."""
        return ",".join(f"{self.host}:{port}" for port in self.ports)

    def start(self) -> SentinelGroup:
        """Start the master, the replica and the sentinels; return once they know each other."""
        from sandbox.redisserver import find_redis_server

        self.master.start()
        self.replica.start()
        binary = find_redis_server()
        assert binary is not None
        bind = "127.0.0.1" if self.host == "127.0.0.1" else f"127.0.0.1 {self.host}"
        for port in self.ports:
            conf = self.directory / f"sentinel-{port}.conf"
            conf.write_text(
                f"port {port}\nbind {bind}\nprotected-mode no\ndir {self.directory}\n"
                f"logfile {self.directory}/sentinel-{port}.log\n"
                f"sentinel monitor {self.MASTER} {self.host} {self.master.port} 2\n"
                f"sentinel down-after-milliseconds {self.MASTER} 1000\n"
                f"sentinel failover-timeout {self.MASTER} 5000\n"
                f"sentinel parallel-syncs {self.MASTER} 1\n"
            )
            self.sentinels.append(
                subprocess.Popen(
                    [binary, str(conf), "--sentinel"],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        # Ready when every sentinel knows the replica and the two other sentinels.
        wait_for(self._ready, timeout=30, interval=0.2, what="the sentinels to know each other")
        wait_for(
            lambda: self.replica_in_sync(), timeout=30, interval=0.2, what="the replica to sync"
        )
        return self

    def _sentinel(self, port: int) -> Any:
        from redis import Redis

        return Redis(host="127.0.0.1", port=port, decode_responses=True, socket_timeout=1)

    def _ready(self) -> bool:
        try:
            for port in self.ports:
                sentinel = self._sentinel(port)
                if len(sentinel.sentinel_slaves(self.MASTER)) < 1:
                    return False
                if len(sentinel.sentinel_sentinels(self.MASTER)) < 2:
                    return False
        except Exception:
            return False
        return True

    def replica_in_sync(self) -> bool:
        """Whether the replica's link to the master is up."""
        from redis import Redis

        info = Redis(port=self.replica.port, socket_timeout=1).info("replication")
        return info.get("master_link_status") == "up"

    def master_port(self) -> int | None:
        """The master's port as the first sentinel that answers names it."""
        for port in self.ports:
            try:
                address = self._sentinel(port).sentinel_get_master_addr_by_name(self.MASTER)
            except Exception:
                continue
            if address:
                return int(address[1])
        return None

    def stop(self) -> None:
        """Stop the sentinels, then both servers."""
        stop_processes(list(self.sentinels), grace_seconds=5)
        self.master.stop()
        self.replica.stop()

    def logs(self) -> str:
        """The sentinels' logs, for a failure message."""
        return "\n".join(p.read_text(errors="replace") for p in self.directory.glob("*.log"))


class Namespace:
    """A network namespace joined to this one by a veth pair (``ip netns``; needs root)."""

    def __init__(self) -> None:
        tag = uuid.uuid4().hex[:6]
        self.name = f"notify-{tag}"
        self.outside, self.inside = f"nfa{tag}", f"nfb{tag}"
        octet = int(tag[:2], 16) % 250 + 2
        self.host_ip, self.ns_ip = f"10.231.{octet}.1", f"10.231.{octet}.2"

    def _ip(self, *args: str, inside: bool = False) -> None:
        prefix = ["ip", "netns", "exec", self.name] if inside else []
        subprocess.run([*prefix, *args], check=True, capture_output=True, timeout=10)

    @property
    def prefix(self) -> list[str]:
        """The command prefix that runs a process inside the namespace."""
        return ["ip", "netns", "exec", self.name]

    def create(self) -> Namespace:
        """Make the namespace and its link, both ends up."""
        self._ip("ip", "netns", "add", self.name)
        self._ip("ip", "link", "add", self.outside, "type", "veth", "peer", "name", self.inside)
        self._ip("ip", "link", "set", self.inside, "netns", self.name)
        self._ip("ip", "addr", "add", f"{self.host_ip}/30", "dev", self.outside)
        self._ip("ip", "link", "set", self.outside, "up")
        self._ip("ip", "addr", "add", f"{self.ns_ip}/30", "dev", self.inside, inside=True)
        self._ip("ip", "link", "set", self.inside, "up", inside=True)
        self._ip("ip", "link", "set", "lo", "up", inside=True)
        return self

    def cut(self) -> None:
        """Take the namespace's end of the link down: nothing passes either way (the kernel
        has no netem or filter qdiscs here). Connections stay open on both sides, as in a
        partition, and resume when the link comes back."""
        self._ip("ip", "link", "set", self.inside, "down", inside=True)

    def heal(self) -> None:
        """Bring the link back up."""
        self._ip("ip", "link", "set", self.inside, "up", inside=True)

    def delete(self) -> None:
        """Remove the namespace and its link."""
        subprocess.run(["ip", "netns", "delete", self.name], capture_output=True, timeout=10)
        subprocess.run(["ip", "link", "delete", self.outside], capture_output=True, timeout=10)


def namespaces_possible() -> str | None:
    """None when a namespace with a veth pair can be made here, else why not."""
    import shutil

    if shutil.which("ip") is None:
        return "the ip command is not installed"
    probe = Namespace()
    try:
        probe.create()
    except (subprocess.CalledProcessError, OSError) as error:
        detail = getattr(error, "stderr", b"") or b""
        return f"network namespaces cannot be made here ({detail.decode(errors='replace').strip()})"
    finally:
        probe.delete()
    return None
