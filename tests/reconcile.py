"""The fault tests' shared reconciliation and fleet helpers (not a test module).

``reconcile`` checks the sandbox's record against the status records and dead letters: every
accepted request ended once, delivered or dead-lettered with the expected reason. The helpers
make requests, workers' environments and the ``notify api`` process the scenarios use
(tests/faults, and the breaker's outage in tests/integration/test_breaker.py).
"""

from __future__ import annotations

import collections
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from sandbox.concur import Sandbox
from sandbox.processes import stop_processes
from tests.harness import OPERATOR_KEY, ROOT, Isolated, WorkerProcess, free_port, wait_for
from worker.runtime import Runtime
from worker.shapes.models import BARE_KEY_PARTNER, message_id
from worker.store import keys
from worker.store.deadletters import DeadLetterFilter

URL = "https://app.example.com/r/1"
REFUSED = "api_rejected"
GATEWAY_KEY = "faults-gateway-" + uuid.uuid4().hex

# Short waits so a fault and its recovery fit in seconds; the visibility timeout must exceed the
# in-flight lease (2 x (1 + 1) + 10 = 14 s with these timeouts).
# Requests the gateway took (ApiService.send): the bare GATEWAY_KEY's partner owns them, so their
# ids are that partner's, not those of the unkeyed producer (Isolated.enqueue_many).
THROUGH_GATEWAY: set[tuple[str, str, str]] = set()


def request_id(user: str, session: str, template: str, url: str | None = None) -> str:
    """The message id a request got, by the way it was sent (the URL is part of it)."""
    through_gateway = (user, session, template) in THROUGH_GATEWAY
    partner = BARE_KEY_PARTNER if through_gateway else None
    return message_id(user, session, template, partner, url=url)


FAST = {
    "NOTIFY_BACKOFF_BASE_SECONDS": "0.2",
    "NOTIFY_BACKOFF_MAX_SECONDS": "1",
    "NOTIFY_HTTP_CONNECT_TIMEOUT_SECONDS": "1",
    "NOTIFY_HTTP_TIMEOUT_SECONDS": "1",
    "NOTIFY_VISIBILITY_TIMEOUT_SECONDS": "20",
    "NOTIFY_RETRY_POLL_INTERVAL_SECONDS": "0.2",
    "NOTIFY_MAX_ATTEMPTS": "8",
    "NOTIFY_WORKER_CONCURRENCY": "16",
}

Request = tuple[str, str, str, str | None]
KILL_MARGIN_SECONDS = 2.0


# -- the shared reconciliation --------------------------------------------------------------------


@dataclass
class Reconciliation:
    """What became of each request, by the sandbox's record and by our own records."""

    delivered: set[str] = field(default_factory=set)
    dead: dict[str, str] = field(default_factory=dict)  # id -> reason
    missing: dict[str, str | None] = field(default_factory=dict)  # id -> state
    duplicated: dict[str, int] = field(default_factory=dict)  # id -> 2xx posts
    excused: dict[str, int] = field(default_factory=dict)  # duplicates a SIGKILL explains
    wrong: list[str] = field(default_factory=list)  # human-readable problems

    def summary(self) -> str:
        return (
            f"delivered={len(self.delivered)} dead={len(self.dead)} missing={len(self.missing)} "
            f"duplicated={len(self.duplicated)} excused={len(self.excused)} "
            f"problems={self.wrong[:10]}"
        )


def states(runtime: Runtime, ids: list[str]) -> list[str | None]:
    """Each message's state, in one pipelined round trip."""
    pipe = runtime.redis.pipeline(transaction=False)
    for ident in ids:
        pipe.hget(keys.message(ident), "state")
    return list(pipe.execute())


def settle(runtime: Runtime, ids: list[str], timeout: float, what: str = "") -> None:
    """Wait until every message is delivered or failed."""

    def finished() -> bool:
        return all(state in ("delivered", "failed") for state in states(runtime, ids))

    try:
        wait_for(finished, timeout=timeout, interval=0.5, what=what or f"{len(ids)} to finish")
    except AssertionError:
        counts = collections.Counter(states(runtime, ids))
        raise AssertionError(f"not settled after {timeout}s: {dict(counts)}") from None


def reconcile(
    runtime: Runtime,
    sandbox: Sandbox,
    requests: list[Request],
    expected_dead: Mapping[str, set[str]] | None = None,
    *,
    killed_at: list[float] | None = None,
) -> Reconciliation:
    """Check every request ended once: delivered (one 2xx) or dead-lettered with a right reason.

    ``expected_dead`` maps a message id to the reasons its dead letter may carry; a message not
    in it must be delivered. A second 2xx is a failure unless ``killed_at`` explains it: its first
    2xx was answered before a SIGKILL and never reached our records (the at-least-once window
    README documents), which ``excused`` counts.
    """
    expected_dead = expected_dead or {}
    result = Reconciliation()
    ok_posts: dict[tuple[str, str, str], list[dict[str, Any]]] = collections.defaultdict(list)
    for record in sandbox.requests():
        status = record["status"]
        body = record["body"] if isinstance(record["body"], dict) else {}
        if status is not None and 200 <= status < 300:
            key = (record["userId"], body.get("sessionId"), body.get("templateId"))
            ok_posts[key].append(record)
    ids = {request_id(u, s, t, url): (u, s, t) for u, s, t, url in requests}
    if len(ids) != len(requests):
        result.wrong.append("the test sent the same request twice")
    strangers = set(ok_posts) - set(ids.values())
    if strangers:
        result.wrong.append(f"{len(strangers)} delivered requests nobody sent")
    dead_index = set(runtime.redis.zrange(keys.DEAD_INDEX, 0, -1))
    for ident, key in ids.items():
        record = runtime.store.status(ident)
        state = record["state"] if record else None
        posts = ok_posts.get(key, [])
        letter = runtime.deadletters.get(ident)
        if state == "delivered":
            result.delivered.add(ident)
            if ident in expected_dead and not expected_dead[ident] & {"delivered"}:
                result.wrong.append(f"{ident} delivered, expected {sorted(expected_dead[ident])}")
            if letter is not None or ident in dead_index:
                result.wrong.append(f"{ident} delivered and also a dead letter")
            if not posts:
                result.wrong.append(f"{ident} recorded delivered, no 2xx in the sandbox")
            elif len(posts) > 1:
                if _explained_by_kill(record or {}, posts, killed_at):
                    result.excused[ident] = len(posts)
                else:
                    result.duplicated[ident] = len(posts)
                    result.wrong.append(
                        f"{ident} posted {len(posts)}x: "
                        + repr([(p["at"], p["correlationId"][:8]) for p in posts])
                        + f" attempts {record['attempts'] if record else None} kills {killed_at}"
                    )
        elif state == "failed":
            reason = letter.reason if letter else "?"
            result.dead[ident] = reason
            if letter is None or ident not in dead_index:
                result.wrong.append(f"{ident} failed without its dead letter")
            if reason not in expected_dead.get(ident, set()):
                result.wrong.append(f"{ident} dead-lettered {reason}, not expected")
            if posts:
                result.wrong.append(f"{ident} dead-lettered after a 2xx")
        else:
            result.missing[ident] = state
    for reason in {r for rs in expected_dead.values() for r in rs} - {"delivered"}:
        held = runtime.deadletters.select(DeadLetterFilter(reason=reason))
        foreign = set(held) - set(ids)
        if foreign:
            result.wrong.append(f"{len(foreign)} {reason} dead letters of no request sent")
    return result


def _explained_by_kill(
    record: dict[str, Any], posts: list[dict[str, Any]], killed_at: list[float] | None
) -> bool:
    if not killed_at:
        return False
    recorded = {attempt.get("cid") for attempt in record.get("attempts", [])}
    # Every 2xx but the last must be unknown to our records and answered around a kill: a post
    # the dying worker had sent may still sit in the sandbox's socket buffer for a moment (the
    # sandbox shares this process with the test), so "around" allows KILL_MARGIN_SECONDS after.
    return all(
        post["correlationId"] not in recorded
        and any(post["at"] <= k + KILL_MARGIN_SECONDS for k in killed_at)
        for post in posts[:-1]
    )


def assert_all_accounted(result: Reconciliation, *, excused_at_most: int = 0) -> None:
    """Nothing missing, nothing duplicated, nothing wrong (see ``reconcile``)."""
    assert not result.wrong, result.summary()
    assert not result.missing, result.summary()
    assert not result.duplicated, result.summary()
    assert len(result.excused) <= excused_at_most, result.summary()


# -- helpers -------------------------------------------------------------------------


def workers_env(isolated: Isolated, api: Sandbox, **extra: str) -> dict[str, str]:
    """The environment of this test's workers."""
    return {**isolated.env, **FAST, "NOTIFY_API_BASE_URL": api.url, **extra}


def requests_for(count: int, users: int = 10, *, prefix: str = "u") -> list[Request]:
    """``count`` distinct requests spread over ``users`` users."""
    run = uuid.uuid4().hex[:8]
    names = [f"{prefix}-{run}-{n}" for n in range(users)]
    return [(names[n % users], f"s-{n}", "welcome", URL) for n in range(count)]


def refused_requests(api: Sandbox, count: int) -> list[Request]:
    """Requests of a user the API answers 400: each must end as an ``api_rejected`` letter."""
    user = f"refused-{uuid.uuid4().hex[:8]}"
    api.script([], user_id=user, then={"status": 400})
    return [(user, f"s-{n}", "welcome", URL) for n in range(count)]


def ids_of(requests: list[Request]) -> list[str]:
    return [request_id(u, s, t, url) for u, s, t, url in requests]


def expect(requests: list[Request], *reasons: str) -> dict[str, set[str]]:
    return {ident: set(reasons) for ident in ids_of(requests)}


def delivered_count(runtime: Runtime, ids: list[str]) -> int:
    return sum(state == "delivered" for state in states(runtime, ids))


def sigkill(worker: WorkerProcess) -> float:
    """Kill a worker at once; returns when (epoch seconds, as the sandbox records)."""
    assert worker.process is not None
    at = time.time()
    worker.process.kill()
    worker.process.wait(timeout=10)
    return at


def restart(worker: WorkerProcess) -> WorkerProcess:
    """Start the same worker (name, environment) again."""
    worker.stop()
    return worker.start()


class ApiService:
    """``notify api`` in a subprocess, logging to a file."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 (closed in stop)
        notify = Path(sys.executable).with_name("notify")
        self.process = subprocess.Popen(
            [str(notify), "api", "--port", str(self.port)],
            cwd=ROOT,
            env={
                **os.environ,
                **env,
                "NOTIFY_GATEWAY_KEYS": GATEWAY_KEY,
                "NOTIFY_OPERATOR_KEYS": OPERATOR_KEY,
            },
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        wait_for(self.ready, timeout=30, what="notify api to answer")

    def ready(self) -> bool:
        try:
            return httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def send(self, requests: list[Request]) -> list[int]:
        """POST each request through the gateway; returns the statuses."""
        statuses = []
        with httpx.Client(
            base_url=self.url, timeout=10, headers={"Authorization": f"Bearer {GATEWAY_KEY}"}
        ) as client:
            for user, session, template, url in requests:
                THROUGH_GATEWAY.add((user, session, template))
                body = {"sessionId": session, "templateId": template, "context": {"url": url}}
                statuses.append(client.post(f"/messages/{user}/session", json=body).status_code)
        return statuses

    def stop(self) -> None:
        stop_processes([self.process], grace_seconds=20)
        self._log.close()
