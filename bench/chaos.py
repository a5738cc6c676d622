"""Every fault at once: a steady load for ``--minutes`` while workers die, Redis fails over, a
worker is cut off, the API goes down and the history's PostgreSQL restarts.

    .venv/bin/python bench/chaos.py --minutes 20        # --json FILE keeps the figures

Starts everything of its own: a Redis master, a replica and three sentinels
(``tests.harness.SentinelGroup``), a private PostgreSQL for the history (``initdb`` and
``pg_ctl`` from /usr/lib/postgresql/*/bin, run as the ``postgres`` user when we are root; the
machine's shared one is never touched), the sandbox in its own process (a 250 ms median with a
lognormal tail to a 1.5 s p99; 30 % of posts answered 500/503/504; the template ``chaos-4xx``
answered 400), and two Procfile workers (``celery -A worker worker``), the second one in a
network namespace of its own (``tests.harness.Namespace``) when one can be made, so that it can
be cut off. Two registry companies, connected as ``notify companies connect`` leaves them, and two
partners send 200 messages a second between them (``enqueue_many``, a batch every 0.1 s).

The faults, at fractions of the run T (a 20-minute run's times in brackets):

* a worker SIGKILLed and started again every T/4, at most every 5 minutes, the last one as the
  sending ends (5, 10, 15, 20 min), the two workers in turn;
* the Sentinel master SIGKILLed at 0.35 T (7:00); the replica takes over;
* the namespaced worker partitioned for 20 s at 0.40 T (8:00);
* the API answering 503 to every post for 60 s at 0.55 T (11:00): the breaker opens;
* the history's PostgreSQL restarted at 0.85 T (17:00).

Then it waits until every message has finished and the schedule is empty, reconciles the
sandbox's record of every post against our records, and prints: messages sent, delivered,
dead-lettered (only the scripted 4xx may be), lost (must be 0), double posts, each one explained
by a post in flight at a kill, an answer lost in the partition or a write lost in the failover
(unexplained: must be 0), the breaker's figures, the history rows against the messages, and the
time from the last fault to an empty schedule. Exit status 1 when anything was lost, dead-lettered
for another reason or posted twice unexplained.

Retries: ``NOTIFY_MAX_ATTEMPTS=30`` with a 2 s backoff base and 30 s cap (the defaults, 8
attempts from 60 s up to 300 s, would leave the odd message dead after 8 failures in a row at a
30 % error rate, and make the tail wait minutes). The publish grace
(``NOTIFY_VISIBILITY_TIMEOUT_SECONDS``) is 300 s instead of 3,600 s: a message whose task a
SIGKILL took with it before the worker noted it as held waits that long on the schedule (seen:
460 messages deferred by the open breaker, published as it closed, taken by a worker killed a
second later). A queued message older than that is published again as well (the extra copy is
refused by ``claim``). The breaker decides on 100 posts in its 60 s window
(``NOTIFY_BREAKER_MIN_CALLS``, 20 by default: one task's posts, which at 30 % errors reach
half failed often enough to open it with no fault) and stays open at most 120 s
(``NOTIFY_BREAKER_MAX_OPEN_SECONDS``, 600 s by default; a failed probe doubles the time, and
one probe in three fails here). Everything else is at its default.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sandbox.processes import stop_processes  # noqa: E402
from sandbox.redisserver import free_port  # noqa: E402
from tests.harness import (  # noqa: E402
    Namespace,
    SentinelGroup,
    WorkerProcess,
    namespaces_possible,
    wait_for,
)

TOKEN = "chaos-token-" + uuid.uuid4().hex
QUEUE = "notify-chaos"
TEMPLATE, REFUSED_TEMPLATE = "chaos", "chaos-4xx"
URL = "https://app.example.com/chaos"
PARTNERS = ("chaos-partner-a", "chaos-partner-b")
COMPANIES = ("c0000000-0000-4000-8000-00000000000a", "c0000000-0000-4000-8000-00000000000b")
CLIENT_ID, CLIENT_SECRET = "chaos-app", "sandbox-client-secret"  # sandbox/oauth.py's secret
FLAPPING = {"errorRatio": 0.3, "statuses": [500, 503, 504]}
REFUSED_EVERY = 100  # one message in 100 uses the template the API refuses (400)
# A post in flight at a kill was sent at most the HTTP timeout (30 s) plus its connect (5 s)
# before it; its 2xx may be decided a moment after the process died.
POST_SECONDS, MARGIN_SECONDS = 35.0, 2.0
PUBLISH_GRACE_SECONDS = 300


# -- the private PostgreSQL ------------------------------------------------------------------------


class PrivatePostgres:
    """A PostgreSQL cluster of this run's own, in a temporary folder, on ``host``."""

    def __init__(self, host: str, clients: tuple[str, ...] = ()) -> None:
        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
        if not found:
            raise RuntimeError("no pg_ctl under /usr/lib/postgresql/*/bin")
        self.bin = Path(found[-1]).parent
        self.host = host
        self.clients = clients  # addresses besides loopback that may connect
        self.port = free_port()
        self.folder = Path(tempfile.mkdtemp(prefix="notify-chaos-pg-"))
        self.data = self.folder / "data"
        # PostgreSQL refuses to run as root: as root, run it as its own user.
        self.prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    @property
    def url(self) -> str:
        """Where the history writers connect."""
        return f"postgresql://postgres@{self.host}:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        subprocess.run([*self.prefix, *args], check=True, capture_output=True, timeout=120)

    def start(self) -> PrivatePostgres:
        """initdb (trust auth) and start it; returns once it accepts connections."""
        if self.prefix:
            shutil.chown(self.folder, "postgres")
        self._run(
            str(self.bin / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres", "-N"
        )
        # initdb trusts loopback only; the namespace's link too (both of its ends).
        with (self.data / "pg_hba.conf").open("a") as hba:
            hba.writelines(f"host all all {address}/32 trust\n" for address in self.clients)
        self._pg_ctl("start")
        return self

    def _pg_ctl(self, action: str, *extra: str) -> None:
        listen = "127.0.0.1" if self.host == "127.0.0.1" else f"127.0.0.1,{self.host}"
        options = f"-p {self.port} -k {self.folder} -c listen_addresses={listen}"
        self._run(
            str(self.bin / "pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.folder / "postgres.log"),
            "-o",
            options,
            "-w",
            *extra,
            action,
        )

    def restart(self) -> float:
        """Restart it (a fast shutdown: sessions cut, then started again); seconds it took."""
        started = time.monotonic()
        self._pg_ctl("restart", "-m", "fast")
        return time.monotonic() - started

    def stop(self) -> None:
        """Stop it and remove its folder."""
        with contextlib.suppress(subprocess.CalledProcessError):
            self._pg_ctl("stop", "-m", "immediate")
        shutil.rmtree(self.folder, ignore_errors=True)


# -- the sandbox, in a process of its own ---------------------------------------------------------


class SandboxProcess:
    """``python -m sandbox.concur`` on ``host``, driven through its control endpoints."""

    def __init__(self, host: str, max_records: int) -> None:
        port = free_port()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "sandbox.concur", "--host", host, "--port", str(port),
             "--latency-ms", "250", "--latency-p99-ms", "1500", "--token", TOKEN,
             "--max-records", str(max_records)],
            cwd=ROOT, stdout=subprocess.PIPE,
        )  # fmt: skip
        assert self.process.stdout is not None
        self.process.stdout.readline()  # "sandbox listening on ..."
        self.root = f"http://{host}:{port}"
        self.url = f"{self.root}/notifications/v4"
        self.http = httpx.Client(base_url=f"{self.root}/_sandbox", timeout=300)
        geolocations = self.http.get("/geolocations").json()["geolocations"]
        primary = next(g for g in geolocations if g["primary"])
        self.geolocation_name, self.geolocation = str(primary["name"]), str(primary["rootUrl"])

    def post(self, path: str, body: Any) -> None:
        self.http.post(path, json=body).raise_for_status()

    def stats(self) -> dict[str, Any]:
        return dict(self.http.get("/stats").json())

    def requests(self) -> list[dict[str, Any]]:
        return list(self.http.get("/requests").json()["requests"])

    def stop(self) -> None:
        stop_processes([self.process])


# -- the run ---------------------------------------------------------------------------------------


@dataclass
class Timeline:
    """When each fault happened (epoch seconds, the sandbox's clock is the same machine's)."""

    kills: list[dict[str, Any]] = field(default_factory=list)
    failover: dict[str, Any] = field(default_factory=dict)
    partition: dict[str, Any] = field(default_factory=dict)
    outage: dict[str, Any] = field(default_factory=dict)
    postgres: dict[str, Any] = field(default_factory=dict)
    breaker: list[tuple[float, str]] = field(default_factory=list)
    last_fault_end: float = 0.0

    def ended(self) -> None:
        self.last_fault_end = max(self.last_fault_end, time.time())


def _worker_env(
    group: SentinelGroup, sandbox: SandboxProcess, postgres: PrivatePostgres, key: str
) -> dict[str, str]:
    from worker.limits.breaker import geolocation_name

    return {
        "NOTIFY_REDIS_URL": f"redis://{group.host}:{group.master.port}/0",
        "NOTIFY_REDIS_SENTINELS": group.addresses,
        "NOTIFY_REDIS_SENTINEL_MASTER": SentinelGroup.MASTER,
        "NOTIFY_QUEUE_NAME": QUEUE,
        "NOTIFY_API_BASE_URL": sandbox.url,
        "NOTIFY_API_TOKEN": TOKEN,
        "NOTIFY_ALLOW_INSECURE_HTTP": "true",
        "NOTIFY_ALLOWED_TEMPLATES": f"{TEMPLATE},{REFUSED_TEMPLATE}",
        "NOTIFY_ALLOWED_URL_DOMAINS": "app.example.com",
        "NOTIFY_HISTORY_URL": postgres.url,
        "NOTIFY_MAX_ATTEMPTS": "30",
        "NOTIFY_BACKOFF_BASE_SECONDS": "2",
        "NOTIFY_BACKOFF_MAX_SECONDS": "30",
        # The breaker judged on 100 posts, not one task's 20: at a 30 % error rate a window
        # decided by its first task opened it at 12 of 23 and 11 of 20 (a 4-minute run opened it
        # four times before any fault); and open at most 120 s, not 600: each failed probe
        # doubles the time, and one probe in three meets a 5xx here (that run's probes failed
        # four times in a row and held every post for 480 s, past the settle time).
        "NOTIFY_BREAKER_MIN_CALLS": "100",
        "NOTIFY_BREAKER_MAX_OPEN_SECONDS": "120",
        # The publish grace: a message whose task a SIGKILL took with it, before the worker
        # noted it as held, waits this long on the schedule (default 3,600 s; reported below).
        "NOTIFY_VISIBILITY_TIMEOUT_SECONDS": str(PUBLISH_GRACE_SECONDS),
        "NOTIFY_OAUTH_CLIENT_ID": CLIENT_ID,
        "NOTIFY_OAUTH_CLIENT_SECRET": CLIENT_SECRET,
        "NOTIFY_TOKEN_ENCRYPTION_KEY": key,
        "NOTIFY_OAUTH_EXTRA_GEOLOCATION_HOSTS": geolocation_name(sandbox.geolocation),
    }


def _connect_companies(sandbox: SandboxProcess, runtime: Any, key: str) -> None:
    """Both companies in the sandbox, each holding a refresh token of our app, and in the
    registry as connected (as ``notify companies connect --refresh-token`` leaves them)."""
    from worker.store.codec import now_ms
    from worker.store.companies import CompanyRegistry
    from worker.store.sealing import Cipher

    sandbox.post(
        "/companies",
        {
            "companies": [
                {"id": c, "geolocation": sandbox.geolocation_name, "requestToken": f"rq-{c}",
                 "refreshToken": f"rt-{c}", "clientId": CLIENT_ID}
                for c in COMPANIES
            ]
        },
    )  # fmt: skip
    registry = CompanyRegistry(runtime.redis, Cipher(key))
    for company in COMPANIES:
        registry.connected(company, f"rt-{company}", None, sandbox.geolocation, now_ms())


class Producer:
    """``--rate`` messages a second between the partners and companies, one thread per
    (partner, company) pair at its share of the rate, each sending with ``enqueue_many`` what is
    due every 0.1 s (more at once when a call was slow: a failover, or ``WAIT`` for the replica
    on a loaded machine), so the rate holds; a batch that fails is sent again until Redis takes
    it."""

    def __init__(self, runtime: Any, rate: int, seconds: float, run: str) -> None:
        self.runtime, self.rate, self.seconds, self.run_tag = runtime, rate, seconds, run
        self.sent: dict[str, tuple[str, str, str, str]] = {}  # id -> user, template, partner, co
        self.errors = 0
        self.behind_max = 0.0  # messages due and not yet sent, at most
        self.failure: BaseException | None = None
        self._lock = threading.Lock()
        self._pairs = [(p, c) for p in PARTNERS for c in COMPANIES]
        self._threads = [
            threading.Thread(target=self._run, args=(index,), daemon=True)
            for index in range(len(self._pairs))
        ]

    def start(self) -> None:
        self.started = time.monotonic()
        for thread in self._threads:
            thread.start()

    def join(self) -> None:
        for thread in self._threads:
            thread.join()

    def _run(self, index: int) -> None:
        try:
            self._produce(index)
        except BaseException as error:  # reported by the main thread
            self.failure = error

    def _produce(self, index: int) -> None:
        import tasks

        partner, company = self._pairs[index]
        share = self.rate / len(self._pairs)
        sent = 0
        while True:
            elapsed = min(self.seconds, time.monotonic() - self.started)
            due = int(elapsed * share)
            if due <= sent:
                if elapsed >= self.seconds:
                    break
                time.sleep(0.1)
                continue
            self.behind_max = max(self.behind_max, due - sent)
            batch: list[tuple[str, str, str, str | None]] = []
            for k in range(sent, min(due, sent + 500)):
                n = k * len(self._pairs) + index  # 0, 1, 2... across the pairs
                template = REFUSED_TEMPLATE if n % REFUSED_EVERY == 7 else TEMPLATE
                batch.append((f"{self.run_tag}-{n}", f"s{n}", template, URL))
            while True:
                try:
                    ids = tasks.enqueue_many(
                        batch, runtime=self.runtime, partner=partner, company=company
                    )
                    break
                except Exception:
                    with self._lock:
                        self.errors += 1
                    time.sleep(0.2)
            with self._lock:
                for (user, _, template, _), ident in zip(batch, ids, strict=True):
                    self.sent[ident] = (user, template, partner, company)
            sent += len(batch)
        self.runtime.publisher.flush(120)


class Fleet:
    """Worker A on this network, worker B in the namespace (when there is one); restarted after
    each SIGKILL under a new name (its log kept)."""

    def __init__(self, env: dict[str, str], logs: Path, namespace: Namespace | None) -> None:
        self.env, self.logs, self.namespace = env, logs, namespace
        self.generation = {"a": 0, "b": 0}
        self.workers: dict[str, WorkerProcess] = {}

    def start(self, which: str) -> WorkerProcess:
        self.generation[which] += 1
        worker = WorkerProcess(f"chaos-{which}{self.generation[which]}", self.logs, self.env)
        prefix = self.namespace.prefix if which == "b" and self.namespace else []
        self.workers[which] = worker.start(timeout=180, prefix=prefix)
        return worker

    def name(self, which: str) -> str:
        process = self.workers[which].process
        assert process is not None
        return f"{socket.gethostname()}:{process.pid}"

    def stop(self) -> None:
        stop_processes([w.process for w in self.workers.values() if w.process is not None])
        for worker in self.workers.values():
            worker.stop()


def _states(runtime: Any, ids: list[str]) -> list[str | None]:
    from worker.store import keys

    out: list[str | None] = []
    for start in range(0, len(ids), 2000):
        pipe = runtime.redis.pipeline(transaction=False)
        for ident in ids[start : start + 2000]:
            pipe.hget(keys.message(ident), "state")
        out.extend(pipe.execute())
    return out


def _in_flight(runtime: Any, worker: str) -> int:
    """How many of a worker's held messages were being posted (``inflight``) at the moment."""
    from worker.store import keys

    held = sorted(runtime.redis.smembers(keys.held(worker)))
    return sum(1 for state in _states(runtime, held) if state == "inflight")


def _kill(fleet: Fleet, runtime: Any, which: str, timeline: Timeline) -> None:
    name = fleet.name(which)
    process = fleet.workers[which].process
    assert process is not None
    at = time.time()
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    in_flight = _in_flight(runtime, name)
    fleet.workers[which].stop()
    fleet.start(which)
    timeline.kills.append({"at": at, "worker": which, "in_flight": in_flight})
    timeline.ended()
    print(f"chaos: SIGKILLed worker {which} ({in_flight} posts in flight)", flush=True)


def _failover(group: SentinelGroup, timeline: Timeline) -> None:
    at = time.time()
    group.master.kill()
    wait_for(
        lambda: group.master_port() == group.replica.port,
        timeout=60,
        interval=0.1,
        what="the sentinels to promote the replica",
    )
    timeline.failover = {"at": at, "promoted_after_s": time.time() - at}
    timeline.ended()
    print(f"chaos: master SIGKILLed, replica promoted after {time.time() - at:.1f}s", flush=True)


def _partition(namespace: Namespace | None, why_not: str | None, timeline: Timeline) -> None:
    if namespace is None:
        timeline.partition = {"skipped": why_not}
        return
    at = time.time()
    namespace.cut()
    time.sleep(20)
    namespace.heal()
    timeline.partition = {"at": at, "healed": time.time()}
    timeline.ended()
    print("chaos: worker b partitioned for 20 s", flush=True)


def _outage(sandbox: SandboxProcess, timeline: Timeline) -> None:
    before = sandbox.stats()
    at = time.time()
    sandbox.post(f"/geolocations/{sandbox.geolocation_name}", {"answer": {"status": 503}})
    time.sleep(60)
    sandbox.post(f"/geolocations/{sandbox.geolocation_name}", {"answer": None, "delayMs": 0})
    after = sandbox.stats()
    timeline.outage = {
        "at": at,
        "ended": time.time(),
        "posts_during": int(after["total"]) - int(before["total"]),
    }
    timeline.ended()
    print(f"chaos: API outage of 60 s, {timeline.outage['posts_during']} posts met it", flush=True)


def _postgres_restart(postgres: PrivatePostgres, timeline: Timeline) -> None:
    at = time.time()
    took = postgres.restart()
    timeline.postgres = {"at": at, "restart_s": took}
    timeline.ended()
    print(f"chaos: PostgreSQL restarted ({took:.1f}s)", flush=True)


def _watch_breaker(runtime: Any, timeline: Timeline, stop: threading.Event) -> None:
    """Every breaker's state four times a second; the changes seen, with their times (the
    default company's geolocation and the companies' are the sandbox's one: one breaker)."""
    last = ""
    while not stop.is_set():
        try:
            breakers = runtime.breakers
            state = ",".join(
                f"{name}={breakers.named(name).status().state}" for name in breakers.names()
            )
        except Exception:
            state = last  # a failover: unknown for a moment
        if state != last:
            timeline.breaker.append((time.time(), state))
            last = state
        stop.wait(0.25)


def _explain(at: float, timeline: Timeline) -> str:
    """Why a 2xx that our records do not hold could happen: the first fault it falls in."""
    for kill in timeline.kills:
        if kill["at"] - POST_SECONDS <= at <= kill["at"] + MARGIN_SECONDS:
            return "in flight at a SIGKILL"
    part = timeline.partition
    if "at" in part and part["at"] - MARGIN_SECONDS <= at <= part["healed"] + MARGIN_SECONDS:
        return "answer lost in the partition"
    fail = timeline.failover
    if fail and fail["at"] - 5 <= at <= fail["at"] + fail["promoted_after_s"] + MARGIN_SECONDS:
        return "delivered written to the old master, lost in the failover"
    return "unexplained"


def reconcile(
    runtime: Any, sandbox: SandboxProcess, sent: dict[str, Any], timeline: Timeline
) -> Any:
    """Every message sent against the sandbox's record of every post and our own records."""
    posts: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    for record in sandbox.requests():
        status = record["status"]
        if status is not None and 200 <= status < 300 and record["userId"]:
            posts[record["userId"]].append(record)
    ids = list(sent)
    counts: collections.Counter[str] = collections.Counter()
    doubles: collections.Counter[str] = collections.Counter()
    examples: list[str] = []
    for ident, state in zip(ids, _states(runtime, ids), strict=True):
        user, template, _, _ = sent[ident]
        ok = sorted(posts.get(user, []), key=lambda r: r["at"])
        if state == "delivered" and ok:
            counts["delivered"] += 1
            if len(ok) > 1:
                counts["posted twice or more"] += 1
                for extra in ok[:-1]:
                    why = _explain(float(extra["at"]), timeline)
                    doubles[why] += 1
                    if why == "unexplained" and len(examples) < 5:
                        examples.append(f"{ident} {user} {[r['at'] for r in ok]}")
        elif state == "failed" and not ok:
            letter = runtime.deadletters.get(ident)
            reason = letter.reason if letter else None
            if template == REFUSED_TEMPLATE and reason == "api_rejected":
                counts["dead-lettered for the scripted 4xx"] += 1
            else:
                counts[f"dead-lettered otherwise ({reason})"] += 1
                if len(examples) < 5:
                    examples.append(f"{ident} {user} {template} dead {reason}")
        elif state in ("queued", "retrying", "inflight"):
            counts["not finished at the end"] += 1  # still on the schedule: late, not lost
        else:
            counts["lost"] += 1
            if len(examples) < 5:
                examples.append(f"{ident} {user} state={state} 2xx={len(ok)}")
    return counts, doubles, examples


def main() -> int:
    """Run every fault at once and print what became of every message."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=20.0, help="how long messages are sent")
    parser.add_argument("--rate", type=int, default=200, help="messages a second")
    parser.add_argument("--settle-minutes", type=float, default=15.0)
    parser.add_argument("--json", type=Path, default=None, help="write the figures here too")
    args = parser.parse_args()
    seconds = args.minutes * 60
    # SIGTERM (a test's timeout, Ctrl-C's cousin) unwinds through the finally below, which stops
    # the servers, the workers and the namespace.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    # The run's settings are its own: none inherited from the caller (a test session's turn the
    # breaker off and time posts out after 1 s), the defaults but for _worker_env's.
    for name in [name for name in os.environ if name.startswith("NOTIFY_")]:
        del os.environ[name]

    logs = Path(tempfile.mkdtemp(prefix="notify-chaos-"))
    why_not = namespaces_possible()
    namespace = None if why_not else Namespace().create()
    host = namespace.host_ip if namespace else "127.0.0.1"
    group = SentinelGroup(logs, host=host)
    postgres = PrivatePostgres(host, (namespace.host_ip, namespace.ns_ip) if namespace else ())
    sandbox: SandboxProcess | None = None
    fleet: Fleet | None = None
    runtime: Any = None
    stop_watch = threading.Event()
    try:
        group.start()
        postgres.start()
        sandbox = SandboxProcess(host, max_records=int(args.rate * seconds * 2.5) + 100_000)
        sandbox.post("/scripts", {"match": {}, "rate": FLAPPING})
        sandbox.post(
            "/scripts", {"match": {"templateId": REFUSED_TEMPLATE}, "then": {"status": 400}}
        )
        from cryptography.fernet import Fernet

        key = Fernet.generate_key().decode()
        env = _worker_env(group, sandbox, postgres, key)
        os.environ.update(env)  # the producer here reads the same settings
        from worker.runtime import Runtime
        from worker.settings import load_settings
        from worker.store import history, keys

        history.upgrade(postgres.url)
        runtime = Runtime.from_settings(load_settings())
        _connect_companies(sandbox, runtime, key)
        api = sandbox
        fleet = Fleet(env, logs, namespace)
        fleet.start("a")
        fleet.start("b")
        print(f"chaos: {args.rate}/s for {args.minutes:g} min; logs in {logs}", flush=True)
        timeline = Timeline()
        watcher = threading.Thread(
            target=_watch_breaker, args=(runtime, timeline, stop_watch), daemon=True
        )
        watcher.start()
        producer = Producer(runtime, args.rate, seconds, uuid.uuid4().hex[:8])
        started, started_epoch = time.monotonic(), time.time()
        producer.start()
        every = min(300.0, seconds / 4)
        faults: list[tuple[float, Any]] = [
            (k * every, lambda k=k: _kill(fleet, runtime, "ab"[(k - 1) % 2], timeline))
            for k in range(1, int(seconds // every) + 1)
        ]
        faults += [
            (0.35 * seconds, lambda: _failover(group, timeline)),
            (0.40 * seconds, lambda: _partition(namespace, why_not, timeline)),
            (0.55 * seconds, lambda: _outage(api, timeline)),
            (0.85 * seconds, lambda: _postgres_restart(postgres, timeline)),
        ]
        # Each fault in a thread of its own: the partition's and the outage's minutes overlap
        # what follows them, as in production.
        threads = []
        for at, fault in sorted(faults, key=lambda f: f[0]):
            time.sleep(max(0.0, started + at - time.monotonic()))
            thread = threading.Thread(target=fault, daemon=True)
            thread.start()
            threads.append(thread)
        producer.join()
        if producer.failure is not None:
            raise producer.failure
        for thread in threads:
            thread.join(timeout=300)
        sending_ended = started + seconds
        # Every message finished and the schedule empty.
        ids = list(producer.sent)
        settle_deadline = time.monotonic() + args.settle_minutes * 60
        finished = False
        while time.monotonic() < settle_deadline:
            states = collections.Counter(_states(runtime, ids))
            if states["delivered"] + states["failed"] == len(ids) and not runtime.redis.zcard(
                keys.SCHEDULE
            ):
                finished = True
                break
            time.sleep(1)
        unfinished = {k: v for k, v in states.items() if k not in ("delivered", "failed")}
        empty_at = time.time()
        settled_after = time.monotonic() - sending_ended
        # The history: every finished message has its outcome row once the outbox is written.
        outbox_deadline = time.monotonic() + 300
        while runtime.redis.xlen(keys.HISTORY_OUTBOX) and time.monotonic() < outbox_deadline:
            time.sleep(1)
        import psycopg

        with psycopg.connect(postgres.url) as conn:
            row = conn.execute("SELECT count(DISTINCT message_id) FROM notify_outcomes").fetchone()
        outcomes = int(row[0]) if row else 0
        stop_watch.set()
        counts, doubles, examples = reconcile(runtime, sandbox, producer.sent, timeline)
        stats = sandbox.stats()
        ours = runtime.redis.hgetall(keys.STATS)
        opened = [at for at, state in timeline.breaker if "=open" in state]
        closed_after_outage = [
            at
            for at, state in timeline.breaker
            if "=open" not in state and "=half_open" not in state
        ]
        figures: dict[str, Any] = {
            "minutes": args.minutes,
            "rate": args.rate,
            "partition": "on" if namespace else f"skipped: {why_not}",
            "sent": len(ids),
            **{k: v for k, v in sorted(counts.items())},
            "double posts": sum(doubles.values()),
            **{f"  {k}": v for k, v in sorted(doubles.items())},
            "unexplained": doubles["unexplained"],
            "examples": examples,
            "producer errors retried": producer.errors,
            "producer most messages behind": producer.behind_max,
            "kills": [
                {
                    "at_s": round(k["at"] - started_epoch),
                    "worker": k["worker"],
                    "in_flight": k["in_flight"],
                }
                for k in timeline.kills
            ],
            "failover promoted after s": round(timeline.failover.get("promoted_after_s", 0), 1),
            "partition window s": [
                round(timeline.partition[k] - started_epoch) for k in ("at", "healed")
            ]
            if "at" in timeline.partition
            else timeline.partition,
            "breaker opened (notify:stats)": int(ours.get("breaker_opened", 0)),
            "breaker transitions": [
                (round(at - timeline.outage.get("at", at), 1), state)
                for at, state in timeline.breaker
            ],
            "breaker opened s after the outage began": round(
                min((a for a in opened if a >= timeline.outage.get("at", 0)), default=0)
                - timeline.outage.get("at", 0),
                1,
            ),
            "breaker closed s after the outage ended": round(
                min(
                    (a for a in closed_after_outage if a >= timeline.outage.get("ended", 0)),
                    default=0,
                )
                - timeline.outage.get("ended", 0),
                1,
            ),
            "posts during the 60 s outage": timeline.outage.get("posts_during"),
            "PostgreSQL restart s": round(timeline.postgres.get("restart_s", 0), 1),
            "history outcomes / finished": f"{outcomes} / {len(ids)}",
            "API posts": stats["total"],
            "API answers by status": stats["byStatus"],
            "finished and schedule empty": finished,
            "unfinished at the end (by state)": unfinished,
            "from the last fault to an empty schedule s": round(
                empty_at - timeline.last_fault_end, 1
            ),
            "from the end of sending to an empty schedule s": round(settled_after, 1),
        }
        for name, value in figures.items():
            print(f"{name:<48} {value}")
        if args.json:
            args.json.write_text(json.dumps(figures, indent=2, default=str))
        bad = (
            counts["lost"]
            or doubles["unexplained"]
            or any(k.startswith("dead-lettered otherwise") for k in counts)
            or not finished
            or outcomes != len(ids)
        )
        return 1 if bad else 0
    finally:
        stop_watch.set()
        if fleet is not None:
            fleet.stop()
        if runtime is not None:
            runtime.close()
        if sandbox is not None:
            sandbox.stop()
        postgres.stop()
        group.stop()
        if namespace is not None:
            namespace.delete()


if __name__ == "__main__":
    raise SystemExit(main())
