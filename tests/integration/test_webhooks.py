"""Outcome webhooks end to end: real workers, real Redis, a loopback receiver (docs/webhooks.md).

Each test runs its workers on a Redis database and queue of its own (``isolated``): the
partner ``default`` (the unkeyed producer's) gets a webhook pointing at a receiver on this
machine, which the workers may post to only with ``NOTIFY_WEBHOOK_ALLOW_PRIVATE=true``.
"""

from __future__ import annotations

import json
import re
import select
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.fernet import Fernet
from standardwebhooks import Webhook

import tasks
from sandbox.concur import Sandbox
from tests import harness
from tests.harness import (
    OPERATOR,
    OPERATOR_KEY,
    PARTNER,
    ROOT,
    TEST_TOKEN,
    Isolated,
    ServerThread,
    dead_letter,
    wait_for,
)
from worker.front.api import create_app
from worker.limits.breaker import Breaker, BreakerPolicy
from worker.store.sealing import Cipher
from worker.store.webhooks import DELIVERED, EXPIRED, FAILED, WebhookStore
from worker.webhooks.delivery import WebhookDelivery, WebhookPolicy

KEY = Fernet.generate_key().decode()
FAST = {
    "NOTIFY_TOKEN_ENCRYPTION_KEY": KEY,
    "NOTIFY_WEBHOOK_ALLOW_PRIVATE": "true",
    "NOTIFY_WEBHOOK_TIMEOUT_SECONDS": "2",
    "NOTIFY_MAX_ATTEMPTS": "3",
    "NOTIFY_BACKOFF_BASE_SECONDS": "0.3",
    "NOTIFY_BACKOFF_MAX_SECONDS": "1",
    "NOTIFY_RETRY_POLL_INTERVAL_SECONDS": "0.1",
}


class Receiver:
    """A partner's endpoint on loopback: records each request; answers ``status``, or holds
    the connection without answering while ``hang`` is set."""

    def __init__(self) -> None:
        self.received: list[tuple[dict[str, str], bytes]] = []
        self.status = 204
        self.headers: dict[str, str] = {}
        self.body = b""
        self.hang = threading.Event()
        # (start, end) of each request, in monotonic seconds, as this server saw it.
        self.spans: list[tuple[float, float]] = []
        self._lock = threading.Lock()
        self._release = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length)
                with receiver._lock:
                    receiver.received.append(
                        ({k.lower(): v for k, v in self.headers.items()}, body)
                    )
                started = time.monotonic()
                try:
                    if receiver.hang.is_set():
                        # Held until the client gives up (its deadline) and closes: what is
                        # counted in flight is what a worker still waits for.
                        receiver.hold(self.connection)
                        return
                    self.send_response(receiver.status)
                    for name, value in receiver.headers.items():
                        self.send_header(name, value)
                    self.send_header("content-length", str(len(receiver.body)))
                    self.end_headers()
                    self.wfile.write(receiver.body)
                finally:
                    with receiver._lock:
                        receiver.spans.append((started, time.monotonic()))

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def hold(self, connection: socket.socket) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not self._release.is_set():
            readable, _, _ = select.select([connection], [], [], 0.05)
            if readable and connection.recv(1, socket.MSG_PEEK) == b"":
                return

    def most_at_once(self, lag: float) -> int:
        """The most requests held at once, each counted ``lag`` seconds shorter at its end (this
        server notices a client's close only when it next looks)."""
        with self._lock:
            edges = [(start, 1) for start, _ in self.spans]
            edges += [(max(start, end - lag), -1) for start, end in self.spans]
        most = now = 0
        for _, step in sorted(edges, key=lambda edge: (edge[0], edge[1])):
            now += step
            most = max(most, now)
        return most

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hooks"

    def events(self) -> list[tuple[dict[str, str], dict[str, Any]]]:
        with self._lock:
            return [(headers, json.loads(body)) for headers, body in self.received]

    def stop(self) -> None:
        self._release.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    running = Receiver()
    yield running
    running.stop()


def webhooks(isolated: Isolated, grace_seconds: int = 3600) -> WebhookStore:
    return WebhookStore(isolated.runtime.redis, Cipher(KEY), rotation_grace_seconds=grace_seconds)


def notify(isolated: Isolated, *args: str) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run(
        [str(Path(sys.executable).with_name("notify")), *args],
        env={**os.environ, **isolated.env, **FAST},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def verified(secret: str, headers: dict[str, str], body: bytes) -> Any:
    return Webhook(secret).verify(body.decode(), headers)


def test_outcomes_reach_the_endpoint_signed_and_verified(
    isolated: Isolated, receiver: Receiver, start_worker: Any, sandbox: Sandbox
) -> None:
    # The operator's command prints the secret on its last line; the events come signed with it.
    done = notify(
        isolated,
        "partners",
        "webhook",
        "set",
        "default",
        receiver.url,
        "--events",
        "message.failed,message.delivered",
    )
    assert done.returncode == 0, done.stderr
    secret = done.stdout.strip().splitlines()[-1]
    assert secret.startswith("whsec_")
    shown = notify(isolated, "partners", "webhook", "show", "default", "--json")
    assert shown.returncode == 0 and secret not in shown.stdout
    assert json.loads(shown.stdout)["events"] == [FAILED, DELIVERED]
    # Stored sealed: the secret is nowhere in Redis in clear text.
    raw = isolated.runtime.redis.hgetall("notify:webhook:partner:default")
    assert secret not in json.dumps(raw, default=str)

    refused_user = f"u-{uuid.uuid4().hex[:8]}"
    errors = [{"errorId": "e1", "errorCode": "INVALID", "errorMessage": "no such user"}]
    sandbox.script([{"status": 400, "errors": errors}], user_id=refused_user)
    start_worker(**isolated.env, **FAST)
    good_user = f"u-{uuid.uuid4().hex[:8]}"
    good, refused = isolated.enqueue_many(
        [(good_user, "s1", "welcome", None), (refused_user, "s1", "welcome", None)]
    )
    wait_for(lambda: len(receiver.events()) >= 2, timeout=60, what="two events")
    by_type = {}
    for headers, body in receiver.received:
        document = verified(secret, headers, body)
        assert headers["webhook-id"].startswith("evt_")
        assert abs(int(headers["webhook-timestamp"]) - time.time()) < 120
        by_type[document["type"]] = document
    assert by_type[DELIVERED]["data"]["id"] == good
    failed = by_type[FAILED]["data"]
    assert failed["id"] == refused
    assert (failed["reason"], failed["status"], failed["errors"]) == ("api_rejected", 400, errors)
    # Sent once each: nothing left on the schedule.
    wait_for(lambda: webhooks(isolated).pending_count() == 0, timeout=30, what="schedule empty")
    assert len(receiver.received) == 2


def test_an_expired_dead_letter_fires_message_expired_and_rotation_signs_with_both(
    isolated: Isolated, receiver: Receiver, start_worker: Any
) -> None:
    store = webhooks(isolated)
    _config, old = store.set("default", receiver.url, [])  # the default: failed + expired
    new = store.rotate("default")
    start_worker(**isolated.env, **FAST)
    # A dead letter with reason `expired`, written as the worker's expiry would write it.
    expired = dead_letter(
        isolated.runtime, f"u-{uuid.uuid4().hex[:8]}", reason="expired", status=None, errors=[]
    )
    wait_for(lambda: receiver.events(), timeout=60, what="the expired event")
    headers, body = receiver.received[0]
    signatures = headers["webhook-signature"].split(" ")
    assert len(signatures) == 2  # the new secret's and, in its grace period, the old one's
    for secret in (new, old):
        document = verified(secret, headers, body)
    assert document["type"] == EXPIRED and document["data"]["id"] == expired
    assert document["data"]["reason"] == "expired"

    # Once the grace period is over, only the new secret signs.
    isolated.runtime.redis.hset("notify:webhook:partner:default", "old_until", 1)
    dead_letter(isolated.runtime, f"u-{uuid.uuid4().hex[:8]}", reason="api_rejected")
    wait_for(lambda: len(receiver.received) >= 2, timeout=60, what="the failed event")
    headers, body = receiver.received[1]
    assert len(headers["webhook-signature"].split(" ")) == 1
    assert verified(new, headers, body)["type"] == FAILED
    with pytest.raises(Exception, match="signature"):
        verified(old, headers, body)


def test_a_message_past_its_deadline_behind_an_open_breaker_fires_message_expired(
    isolated: Isolated, receiver: Receiver, start_worker: Any, sandbox: Sandbox
) -> None:
    # End to end: the worker's own expiry (not a dead letter written by hand) fires the event.
    store = webhooks(isolated)
    _config, secret = store.set("default", receiver.url, [])  # the default: failed + expired
    start_worker(**isolated.env, **FAST, NOTIFY_BREAKER_ENABLED="true")
    Breaker(isolated.runtime.redis, BreakerPolicy(enabled=True)).force_open()
    user = f"u-{uuid.uuid4().hex[:8]}"
    deadline = datetime.now(UTC) + timedelta(seconds=3)
    ident = tasks.enqueue(user, "s-1", "welcome", runtime=isolated.runtime, expires_at=deadline)
    wait_for(lambda: receiver.events(), timeout=60, what="the expired event")
    headers, body = receiver.received[0]
    document = verified(secret, headers, body)
    assert document["type"] == EXPIRED and document["data"]["id"] == ident
    assert document["data"]["reason"] == "expired"
    assert sandbox.requests(user_id=user) == []


def test_a_dead_endpoint_is_retried_then_dead_lettered_while_concur_posts_go_on(
    isolated: Isolated, receiver: Receiver, start_worker: Any, api: Sandbox
) -> None:
    # The partner's endpoint accepts connections and never answers; every delivered message
    # fires an event at it. Concur (this test's own sandbox, 20 ms per answer) is drained at the
    # same rate with and without it, and the webhook posts never hold more threads than
    # NOTIFY_WEBHOOK_CONCURRENCY.
    api.configure(latency_ms=20)
    env = {**isolated.env, **FAST, "NOTIFY_API_BASE_URL": api.url, "NOTIFY_API_TOKEN": TEST_TOKEN}
    env["NOTIFY_WEBHOOK_CONCURRENCY"] = "2"
    env["NOTIFY_BREAKER_ENABLED"] = "false"  # the breaker would pause the endpoint early
    start_worker(**env)
    count = 250

    def drain(tag: str) -> float:
        before = api.stats()["delivered"]
        users = [(f"u-{tag}-{i}", "s", "welcome", None) for i in range(count)]
        ids = isolated.enqueue_many(users)
        wait_for(
            lambda: api.stats()["delivered"] - before >= count,
            timeout=180,
            interval=0.2,
            what=f"{tag}: {count} posts",
        )
        posts = [r for r in api.requests() if str(r.get("userId", "")).startswith(f"u-{tag}-")]
        times = sorted(float(r["at"]) for r in posts)
        wait_for(
            lambda: all(isolated.state(i) == "delivered" for i in ids),
            timeout=60,
            interval=0.5,
            what=f"{tag}: recorded delivered",
        )
        return count / max(times[-1] - times[0], 1e-3)

    # Interleaved (A B A): the machine is shared, so the baseline is measured on both sides.
    before = drain("base1")
    receiver.hang.set()
    store = webhooks(isolated)
    store.set("default", receiver.url, [DELIVERED])
    with_dead_endpoint = drain("hook")
    store.set("default", receiver.url, [FAILED])  # its events keep hanging on the endpoint
    after = drain("base2")
    print(f"posts/s to Concur: {before:.0f} and {after:.0f} alone, {with_dead_endpoint:.0f} with")
    assert with_dead_endpoint >= 0.6 * min(before, after), (before, with_dead_endpoint, after)
    # Each held post lasts its 2 s deadline; a third at once would overlap by far more than the
    # half second this server may take to notice a client gave up. A held post is recorded when
    # it ends: on a quiet machine the three drains are over before the first one has.
    wait_for(lambda: len(receiver.spans) >= 4, timeout=60, what="four held posts to end")
    assert 0 < receiver.most_at_once(lag=0.5) <= 2, receiver.most_at_once(lag=0.0)

    # Each event is retried (3 attempts, NOTIFY_MAX_ATTEMPTS) then becomes a webhook dead letter,
    # listed by `notify failed list --kind webhook`. Let the endpoint fail fast now.
    receiver.status = 503
    receiver.hang.clear()
    receiver._release.set()
    wait_for(
        lambda: store.dead_count() >= count,
        timeout=240,
        interval=0.5,
        what="every event dead-lettered",
    )
    letter = store.dead_letters(limit=1)[0]
    assert letter.attempts == 3 and letter.dead_reason in ("http_status", "timeout")
    listed = notify(isolated, "failed", "list", "--kind", "webhook", "--json", "--limit", "5")
    assert listed.returncode == 0, listed.stderr
    items = json.loads(listed.stdout)["items"]
    assert len(items) == 5 and {item["kind"] for item in items} == {"webhook"}


def test_names_resolving_to_loopback_or_metadata_are_refused_at_send_time(
    isolated: Isolated, receiver: Receiver
) -> None:
    # In-process, with the real sender and an injected resolver: the URL names a host; what it
    # resolves to decides. Nothing reaches the receiver, and the attempts count.
    store = webhooks(isolated)
    port = receiver.server.server_address[1]
    policy = WebhookPolicy(allow_private=False, timeout_seconds=2)
    answers = {
        "hooks.example.com": ["127.0.0.1"],
        "meta.example.com": ["169.254.169.254"],
    }
    delivery = WebhookDelivery(store, policy, resolver=lambda host, _port: answers[host])
    for host in answers:
        store.set("default", f"https://{host}:{port}/hooks", [])
        event_id = store.test_event("default")
        assert delivery.attempt(event_id) == "retry"
        event = store.event(event_id)
        assert event is not None and event.attempts == 1
        assert event.detail is not None and "resolves to" in event.detail
    # localhost through the system's resolver: refused too, and so is plain http:// to it.
    system = WebhookDelivery(store, policy)
    for url in (f"https://localhost:{port}/hooks", receiver.url):
        store.set("default", url, [])
        event_id = store.test_event("default")
        assert system.attempt(event_id) == "retry"
    assert receiver.received == []
    # With private addresses allowed (development), the same name reaches the receiver.
    store.set("default", receiver.url, [])
    event_id = store.test_event("default")
    allowed = WebhookDelivery(store, WebhookPolicy(allow_private=True, timeout_seconds=2))
    assert allowed.attempt(event_id) == "sent"
    assert len(receiver.received) == 1
    assert allowed.attempt(event_id) == "skipped"  # a second copy of the task sends nothing


def test_the_endpoint_breaker_pauses_events_without_spending_attempts(
    isolated: Isolated, receiver: Receiver
) -> None:
    from worker.limits.breaker import BreakerPolicy

    store = webhooks(isolated)
    store.set("default", receiver.url, [])
    receiver.status = 500
    breaker = BreakerPolicy(
        window_seconds=30, min_calls=2, failure_ratio=0.5, open_seconds=30, probe_lease_seconds=5
    )
    delivery = WebhookDelivery(
        store, WebhookPolicy(allow_private=True, timeout_seconds=2, breaker=breaker)
    )
    first, second, third = (store.test_event("default") for _ in range(3))
    assert delivery.attempt(first) == "retry"
    assert delivery.attempt(second) == "retry"  # the breaker opens: 2 of 2 failed
    assert delivery.attempt(third) == "paused"
    event = store.event(third)
    assert event is not None and event.attempts == 0 and event.state == "pending"
    name = f"127.0.0.1:{receiver.server.server_address[1]}"
    assert delivery.breaker(name).status().state == "open"
    # Concur's breaker is untouched.
    assert not isolated.runtime.redis.exists("notify:breaker")
    assert len(receiver.received) == 2


def test_a_removed_webhook_dead_letters_its_pending_events(isolated: Isolated) -> None:
    store = webhooks(isolated)
    store.set("default", "https://hooks.example.com/in", [])
    event_id = store.test_event("default")
    assert store.remove("default")
    delivery = WebhookDelivery(store, WebhookPolicy())
    assert delivery.attempt(event_id) == "dead"
    [letter] = store.dead_letters()
    assert (letter.id, letter.dead_reason, letter.attempts) == (event_id, "no_webhook", 0)
    assert store.replay(event_id) and store.pending_count() == 1


def test_events_are_written_only_for_the_types_a_partner_chose(
    isolated: Isolated,
) -> None:
    store = webhooks(isolated)
    store.set("default", "https://hooks.example.com/in", [])  # failed + expired
    dead_letter(isolated.runtime, f"u-{uuid.uuid4().hex[:8]}", reason="api_rejected")
    dead_letter(isolated.runtime, f"u-{uuid.uuid4().hex[:8]}", reason="expired")
    dead_letter(isolated.runtime, f"u-{uuid.uuid4().hex[:8]}", reason="x", partner="other")
    ids = [str(i) for i in isolated.runtime.redis.zrange("notify:webhook:schedule", 0, -1)]
    types = sorted(store.event(i).type for i in ids)  # type: ignore[union-attr]
    assert types == [EXPIRED, FAILED]  # partner "other" has no webhook
    store.set("default", "https://hooks.example.com/in", [EXPIRED])
    dead_letter(isolated.runtime, f"u-{uuid.uuid4().hex[:8]}", reason="api_rejected")
    assert store.pending_count() == 2


CSRF = re.compile(r'name="csrf" value="([^"]+)"')


def test_the_operator_api_and_the_console_show_a_webhook_but_never_its_secret(
    isolated: Isolated,
) -> None:
    settings = harness.app_settings(
        redis_url=isolated.env["NOTIFY_REDIS_URL"], token_encryption_key=KEY
    )
    with (
        ServerThread(create_app(settings, isolated.runtime)) as server,
        httpx.Client(base_url=server.url, timeout=30, follow_redirects=True) as http,
    ):
        path = "/partners/acme/webhook"
        body = {"url": "https://hooks.example.com/in?k=1", "events": ["message.delivered"]}
        assert http.put(path, json=body, headers=PARTNER).status_code == 403
        answer = http.put(path, json=body, headers=OPERATOR)
        assert answer.status_code == 200, answer.text
        secret = answer.json()["secret"]
        assert secret.startswith("whsec_")
        assert answer.json()["webhook"]["events"] == [DELIVERED]
        again = http.put(path, json={"url": body["url"]}, headers=OPERATOR).json()
        assert again["secret"] == secret  # setting it again keeps the secret
        assert again["webhook"]["events"] == [FAILED, EXPIRED]
        shown = http.get(path, headers=OPERATOR)
        assert shown.status_code == 200 and secret not in shown.text
        assert shown.json()["breaker"] == "closed"
        rotated = http.post(path + "/rotate", headers=OPERATOR).json()
        assert rotated["secret"] != secret
        assert rotated["webhook"]["previous_secret_until"] is not None
        assert webhooks(isolated).signing_secrets("acme") == [rotated["secret"], secret]
        refused = http.put(path, json={"url": "https://169.254.169.254/"}, headers=OPERATOR)
        assert refused.status_code == 400 and "metadata" in refused.text
        queued = http.post(path + "/test", headers=OPERATOR)
        assert queued.status_code == 202 and queued.json()["eventId"].startswith("evt_")

        login = http.get("/console/webhooks")
        token = CSRF.search(login.text)
        assert token is not None
        http.post(
            "/console/login",
            data={"csrf": token.group(1), "key": OPERATOR_KEY, "next": "/console/webhooks"},
        )
        page = http.get("/console/webhooks")
        assert page.status_code == 200
        assert "https://hooks.example.com/in?k=1" in page.text
        assert "message.failed, message.expired" in page.text
        assert '<span class="badge closed">closed</span>' in page.text
        assert secret not in page.text and rotated["secret"] not in page.text
        assert "whsec_" not in page.text

        assert http.delete(path, headers=OPERATOR).status_code == 204
        assert http.get(path, headers=OPERATOR).status_code == 404
        # The queued test event has no webhook to go to: a webhook dead letter, listed.
        delivery = WebhookDelivery(webhooks(isolated), WebhookPolicy())
        assert delivery.attempt(queued.json()["eventId"]) == "dead"
        listed = http.get("/webhooks/failed", params={"partner": "acme"}, headers=OPERATOR)
        assert [item["id"] for item in listed.json()["items"]] == [queued.json()["eventId"]]
        assert listed.json()["items"][0]["reason"] == "no_webhook"


def test_the_webhook_commands(isolated: Isolated) -> None:
    # In this process (click's runner) with the isolated database's environment: a notify
    # process per command costs seconds each on a busy machine.
    from click.testing import CliRunner

    from worker.front import cli
    from worker.settings import get_settings

    def run(*args: str, **env: str) -> Any:
        get_settings.cache_clear()
        cli._runtime.cache_clear()
        try:
            return CliRunner().invoke(
                cli.main, ["partners", "webhook", *args], env={**isolated.env, **FAST, **env}
            )
        finally:
            get_settings.cache_clear()
            cli._runtime.cache_clear()

    url = "https://hooks.example.com/in"
    unsealed = run("set", "acme", url, NOTIFY_TOKEN_ENCRYPTION_KEY="")
    assert unsealed.exit_code == 2 and "NOTIFY_TOKEN_ENCRYPTION_KEY" in unsealed.output
    assert run("set", "acme", "http://hooks.example.com/in").exit_code == 1
    assert run("set", "acme", url, "--events", "message.bounced").exit_code == 1
    assert run("set", "Not A Partner", url).exit_code == 1
    first = run("set", "acme", url)
    assert first.exit_code == 0, first.output
    secret = first.output.strip().splitlines()[-1]
    rotated = run("rotate", "acme")
    assert rotated.exit_code == 0, rotated.output
    new = rotated.output.strip().splitlines()[-1]
    assert new.startswith("whsec_") and new != secret
    shown = run("show")
    assert shown.exit_code == 0 and url in shown.output and "previous secret" in shown.output
    assert secret not in shown.output and new not in shown.output
    assert webhooks(isolated).signing_secrets("acme") == [new, secret]
    assert run("test", "acme", "--wait", "0").exit_code == 0
    assert run("remove", "acme").exit_code == 0
    assert run("remove", "acme").exit_code == 4
    assert run("rotate", "acme").exit_code == 4


def test_the_post_is_pinned_to_the_checked_address_follows_no_redirect_and_bounds_the_answer(
    receiver: Receiver,
) -> None:
    from worker.concur.transport import ExchangeFailed
    from worker.rules.endpoints import Endpoint
    from worker.webhooks import sender
    from worker.webhooks.guard import Target

    port = receiver.server.server_address[1]
    # A name that never resolves (.invalid), pinned to the address the guard checked: the post
    # reaches it without resolving the name, and says the name in Host.
    endpoint = Endpoint(f"http://hooks.invalid:{port}/in", "http", "hooks.invalid", port)
    target = Target(endpoint, "127.0.0.1")
    answer = sender.post(target, {"x-test": "1"}, b"{}", timeout_seconds=5)
    assert answer.status == 204
    assert receiver.received[-1][0]["host"] == f"hooks.invalid:{port}"
    receiver.status, receiver.headers = 302, {"location": f"http://127.0.0.1:{port}/elsewhere"}
    assert sender.post(target, {}, b"{}", timeout_seconds=5).status == 302
    assert len(receiver.received) == 2  # not followed
    receiver.status, receiver.headers, receiver.body = 200, {}, b"x" * (64 * 1024 + 1)
    with pytest.raises(ExchangeFailed) as failed:
        sender.post(target, {}, b"{}", timeout_seconds=5)
    assert failed.value.kind == "protocol" and "larger than" in failed.value.detail
    receiver.body = b""
    receiver.hang.set()
    started = time.monotonic()
    with pytest.raises(ExchangeFailed) as failed:
        sender.post(target, {}, b"{}", timeout_seconds=1)
    assert failed.value.kind == "timeout" and time.monotonic() - started < 5


def test_webhook_dead_letters_can_be_forgotten(isolated: Isolated) -> None:
    store = webhooks(isolated)
    store.set("default", "https://hooks.example.com/in", [])
    events = [store.test_event("default") for _ in range(3)]
    store.remove("default")
    delivery = WebhookDelivery(store, WebhookPolicy())
    assert [delivery.attempt(e) for e in events] == ["dead"] * 3
    # Newest first by the time each died; two that died in one millisecond (a fast machine) may
    # come in either order, so the order is checked on the recorded times.
    everything = store.dead_letters()
    assert sorted(e.id for e in everything) == sorted(events)
    died = [e.dead_ms or 0 for e in everything]
    assert died == sorted(died, reverse=True) and died[-1] > 0
    assert [e.id for e in store.dead_letters(limit=2)] == [e.id for e in everything[:2]]
    assert store.forget(events[0]) and not store.forget(events[0])
    assert store.dead_count() == 2 and store.pending_count() == 0
