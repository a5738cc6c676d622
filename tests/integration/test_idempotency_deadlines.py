"""Issue 22, items 2 and 3 against real Redis, the real HTTP service, real workers and the
sandbox: explicit idempotency keys (one id however many connections send it at once, 409 for
another body), the implicit rule covering the URL, deadlines that hold behind an open breaker and
a retry's backoff, and cancelling before and after the post.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

import tasks
from tests import harness
from tests.harness import (
    OPERATOR,
    OPERATOR_KEY,
    OTHER_PARTNER_KEY,
    PARTNER,
    PARTNER_KEY,
    Isolated,
    ServerThread,
    request_body,
    wait_for,
)
from worker.limits.breaker import Breaker, BreakerPolicy
from worker.queue.envelopes import Envelope
from worker.rules.validation import InvalidRequest
from worker.shapes.models import Message, idempotency_digest
from worker.store import keys
from worker.store.codec import now_ms

OTHER_PARTNER = {"Authorization": f"Bearer {OTHER_PARTNER_KEY}"}
URL = "https://app.example.com/reports/1"


@pytest.fixture(scope="module")
def app_settings() -> Any:
    """The shared ``server``'s settings here: PARTNER is partner ``gateway`` (a bare key),
    OTHER_PARTNER partner ``other``."""
    from worker.settings import load_settings

    return load_settings(
        gateway_keys=f"{PARTNER_KEY},other:{OTHER_PARTNER_KEY}", operator_keys=OPERATOR_KEY
    )


def _post(client: httpx.Client, user: str, body: dict[str, Any], **headers: str) -> httpx.Response:
    return client.post(f"/messages/{user}/session", json=body, headers={**PARTNER, **headers})


def _state(runtime: Any, message_id: str) -> str | None:
    record = runtime.store.status(message_id)
    return None if record is None else str(record["state"])


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat().replace("+00:00", "Z")


# -- the store's scripts (real Redis, no worker) ---------------------------------------------------


def _request(user: str, url: str = URL) -> dict[str, Any]:
    return Message.create(user, "s-1", "welcome", url).to_wire()


def test_a_waiting_message_is_due_again_no_later_than_its_deadline(isolated: Isolated) -> None:
    store = isolated.runtime.store
    deadline = now_ms() + 10_000  # the tests' publish grace (visibility timeout) is 30 s
    message = Message.create("u-1", "s-1", "welcome", URL).expiring(deadline)
    [(created, _)] = tasks.record([message], runtime=isolated.runtime)
    assert created
    # The schedule's publish grace (the visibility timeout) is longer: the deadline comes first.
    assert isolated.runtime.redis.zscore(keys.SCHEDULE, message.id) == deadline
    envelope = Envelope(message.id, 1, message.to_wire())
    claim = store.claim(envelope, owner="o1", worker="w", task_id="t")
    assert (claim.verdict, claim.expires_ms) == ("go", deadline)
    # A breaker's pause (or a rate limit's, a token outage's, a backoff) an hour long...
    assert store.defer(message.id, "o1", now_ms() + 3_600_000)
    assert isolated.runtime.redis.zscore(keys.SCHEDULE, message.id) == deadline
    assert store.status(message.id)["next"] == str(deadline)
    # ...and a claim once it has passed takes it only to dead-letter it: no attempt counted.
    isolated.runtime.redis.hset(keys.message(message.id), "exp", now_ms() - 1)
    late = store.claim(
        Envelope(message.id, 2, message.to_wire()), owner="o2", worker="w", task_id="t"
    )
    assert (late.verdict, late.attempt) == ("expired", 0)


def test_an_expired_letter_replayed_by_an_operator_is_sent_without_its_deadline(
    isolated: Isolated,
) -> None:
    from worker.delivery import ends
    from worker.store.codec import Failure

    store = isolated.runtime.store
    message = Message.create("u-5", "s-1", "welcome", URL).expiring(now_ms() + 60_000)
    tasks.record([message], runtime=isolated.runtime)
    isolated.runtime.redis.hset(keys.message(message.id), "exp", now_ms() - 1)  # it has passed
    claim = store.claim(
        Envelope(message.id, 1, message.to_wire()), owner="o", worker="w", task_id="t"
    )
    end = ends.expired(message.id, "o", claim)
    assert store.dead_letter(message.id, end.failure, owner="o")
    letter = isolated.runtime.deadletters.get(message.id)
    assert letter is not None and (letter.reason, letter.attempts) == ("expired", 0)
    assert isinstance(end.failure, Failure) and "passed before it could be posted" in letter.detail
    replayed = store.replay(message.id)
    assert replayed is not None
    assert "exp" not in store.status(message.id)
    again = store.claim(replayed, owner="o2", worker="w", task_id="t2")
    assert (again.verdict, again.expires_ms) == ("go", None)


def test_a_laned_message_with_a_deadline_is_on_the_schedule_at_its_deadline(
    isolated: Isolated,
) -> None:
    from worker.store.records import MessageStore, NewRecord

    store = MessageStore(
        isolated.runtime.redis,
        publish_grace_seconds=3600,
        lease_seconds=60,
        status_ttl_seconds=600,
        laned=True,
    )
    deadline = now_ms() + 120_000
    [(created, state)] = store.create_each(
        [("laned-1", _request("u-2"))], [NewRecord(expires_ms=deadline)]
    )
    assert (created, state) == (True, "queued")
    # In its lane for the dispatcher, and on the schedule at its deadline, so it expires on time
    # even while its lane waits (a paused geolocation).
    assert isolated.runtime.redis.zscore(keys.SCHEDULE, "laned-1") == deadline
    assert isolated.runtime.redis.llen(keys.lane("default", "default")) == 1


def test_cancel_ends_a_waiting_message_and_a_task_that_carries_it_is_refused(
    isolated: Isolated,
) -> None:
    store = isolated.runtime.store
    message = Message.create("u-3", "s-1", "welcome", URL, "acme")
    tasks.record([message], runtime=isolated.runtime)
    assert store.cancel(message.id, partner="beta") == ("missing", "")  # not beta's
    assert store.cancel(message.id, partner="acme") == ("cancelled", "queued")
    assert store.cancel(message.id, partner="acme") == ("cancelled", "cancelled")
    assert isolated.runtime.redis.zscore(keys.SCHEDULE, message.id) is None
    # The task published at intake still carries generation 1: refused, never posted.
    claim = store.claim(
        Envelope(message.id, 1, message.to_wire()), owner="o", worker="w", task_id="t"
    )
    assert (claim.verdict, claim.state) == ("done", "cancelled")
    assert isolated.runtime.redis.ttl(keys.message(message.id)) > 0  # kept like a delivered one
    # One being posted (claimed) is refused: it may be delivered any moment.
    other = Message.create("u-3", "s-2", "welcome", URL)
    tasks.record([other], runtime=isolated.runtime)
    store.claim(Envelope(other.id, 1, other.to_wire()), owner="o", worker="w", task_id="t")
    assert store.cancel(other.id, partner=None) == ("refused", "inflight")
    assert store.cancel("nosuchmessage", partner=None) == ("missing", "")
    assert isolated.runtime.redis.hget(keys.LIVE, "inflight") == "1"  # the gauges stay exact
    from worker.front.stats import collect, render_prometheus

    assert collect(isolated.runtime).totals["cancelled"] == 1
    assert "notify_cancelled_total 1.0" in render_prometheus(collect(isolated.runtime))


def test_the_same_key_from_many_connections_at_once_records_one_message(
    isolated: Isolated,
) -> None:
    body = request_body()
    results: list[Any] = []
    lock = threading.Lock()
    start = threading.Barrier(12)

    def send() -> None:
        start.wait()
        try:
            outcome: Any = tasks.submit(
                "u-4", body, runtime=isolated.runtime, idempotency_key="k-1"
            )
        except tasks.IdempotencyConflict as conflict:
            outcome = conflict
        with lock:
            results.append(outcome)

    threads = [threading.Thread(target=send) for _ in range(12)]  # a connection per thread
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(isinstance(result, tasks.Enqueued) for result in results), results
    assert len({result.id for result in results}) == 1
    assert sum(not result.duplicate for result in results) == 1
    digest = idempotency_digest("k-1")
    held = isolated.runtime.redis.get(keys.idempotency("default", digest))
    assert held is not None and held.endswith(" " + results[0].id)
    ttl = isolated.runtime.redis.ttl(keys.idempotency("default", digest))
    assert 86_400 - 60 < ttl <= 86_400  # the window, not the status TTL


# -- the gateway, the session worker and the shared sandbox ---------------------------------------


# These need the session's worker (it shares the test runtime's database and the shared sandbox).
needs_worker = pytest.mark.usefixtures("celery_worker_process")


@needs_worker
def test_the_same_key_and_body_give_one_id_and_one_post(
    http: httpx.Client, runtime: Any, sandbox: Any, user_id: str
) -> None:
    body = request_body()
    key = f"order-{uuid.uuid4()}"
    first = _post(http, user_id, body, **{"Idempotency-Key": key})
    again = _post(http, user_id, body, **{"Idempotency-Key": key})
    assert first.status_code == again.status_code == 202
    assert first.json()["id"] == again.json()["id"]
    assert (first.json()["duplicate"], again.json()["duplicate"]) == (False, True)
    assert "idempotent-replayed" not in first.headers
    assert again.headers["Idempotent-Replayed"] == "true"
    ident = first.json()["id"]
    wait_for(lambda: _state(runtime, ident) == "delivered", timeout=30, what="delivered")
    third = _post(http, user_id, body, **{"Idempotency-Key": key})
    assert (third.json()["id"], third.json()["status"]) == (ident, "delivered")
    time.sleep(0.5)  # a second post, were there one, would have been made by now
    assert len(sandbox.requests(user_id=user_id)) == 1


@needs_worker
def test_the_same_key_with_another_body_is_a_409_naming_the_first_message(
    http: httpx.Client, runtime: Any, user_id: str
) -> None:
    key = f"order-{uuid.uuid4()}"
    first = _post(http, user_id, request_body(url=URL), **{"Idempotency-Key": key})
    other_body = request_body(url=URL + "?v=2")
    refused = _post(http, user_id, other_body, **{"Idempotency-Key": key})
    assert refused.status_code == 409
    [error] = refused.json()["errors"]
    assert error["errorCode"] == "IDEMPOTENCY_KEY_REUSED"
    assert first.json()["id"] in error["errorMessage"]
    assert refused.headers["Location"] == f"/messages/{first.json()['id']}"
    # Nothing was recorded for the other body.
    would_be = Message.create(
        user_id, other_body["sessionId"], "welcome", URL + "?v=2", "gateway"
    ).keyed(key)
    assert runtime.store.status(would_be.id) is None
    # Another partner's same key is its own: no conflict, another message.
    theirs = http.post(
        f"/messages/{user_id}/session",
        json=other_body,
        headers={**OTHER_PARTNER, "Idempotency-Key": key},
    )
    assert theirs.status_code == 202 and theirs.json()["duplicate"] is False
    assert theirs.json()["id"] != first.json()["id"]


@needs_worker
def test_the_same_key_from_two_connections_at_once_gets_one_id_and_one_post(
    server: ServerThread, runtime: Any, sandbox: Any, user_id: str
) -> None:
    body = request_body()
    key = f"order-{uuid.uuid4()}"
    senders = 8
    start = threading.Barrier(senders)
    answers: list[httpx.Response] = []
    lock = threading.Lock()

    def send() -> None:
        # Each thread its own client: its own TCP connection to the service.
        with httpx.Client(base_url=server.url, timeout=30) as client:
            start.wait()
            answer = _post(client, user_id, body, **{"Idempotency-Key": key})
        with lock:
            answers.append(answer)

    threads = [threading.Thread(target=send) for _ in range(senders)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [answer.status_code for answer in answers] == [202] * senders
    ids = {answer.json()["id"] for answer in answers}
    assert len(ids) == 1
    assert sum(answer.json()["duplicate"] is False for answer in answers) == 1
    [ident] = ids
    wait_for(lambda: _state(runtime, ident) == "delivered", timeout=30, what="delivered")
    time.sleep(0.5)
    assert len(sandbox.requests(user_id=user_id)) == 1


@needs_worker
def test_without_a_key_a_new_url_is_a_new_message(
    http: httpx.Client, runtime: Any, sandbox: Any, user_id: str
) -> None:
    session = f"s-{uuid.uuid4().hex[:8]}"
    first = _post(http, user_id, request_body(session, url=URL))
    same = _post(http, user_id, request_body(session, url=URL))
    moved = _post(http, user_id, request_body(session, url=URL + "?page=2"))
    assert (first.json()["duplicate"], same.json()["duplicate"]) == (False, True)
    assert same.json()["id"] == first.json()["id"]
    assert moved.json()["duplicate"] is False and moved.json()["id"] != first.json()["id"]
    for ident in (first.json()["id"], moved.json()["id"]):
        wait_for(lambda i=ident: _state(runtime, i) == "delivered", timeout=30, what="delivered")
    urls = sorted(post["body"]["context"]["url"] for post in sandbox.requests(user_id=user_id))
    assert urls == [URL, URL + "?page=2"]


def test_bad_keys_and_deadlines_are_refused_and_nothing_is_queued(
    http: httpx.Client, user_id: str
) -> None:
    cases = {
        "INVALID_IDEMPOTENCY_KEY": {"Idempotency-Key": "x" * 256},
        "INVALID_DEADLINE": {"Expires-At": "2026-12-01T10:00:00"},  # no time zone
    }
    for code, headers in cases.items():
        refused = _post(http, user_id, request_body(), **headers)
        assert refused.status_code == 400, refused.text
        assert [e["errorCode"] for e in refused.json()["errors"]] == [code]
    past = _post(http, user_id, request_body(), **{"Expires-At": "2020-01-01T00:00:00Z"})
    assert past.status_code == 400 and past.json()["errors"][0]["errorCode"] == "INVALID_DEADLINE"
    twice = http.post(
        f"/messages/{user_id}/session",
        json=request_body(),
        headers=[*PARTNER.items(), ("Idempotency-Key", "a"), ("Idempotency-Key", "b")],
    )
    assert twice.status_code == 400


@needs_worker
def test_a_delivered_message_cannot_be_cancelled_and_another_partners_is_not_found(
    http: httpx.Client, runtime: Any, user_id: str
) -> None:
    deadline = _iso(now_ms() + 3_600_000)
    sent = _post(http, user_id, request_body(), **{"Expires-At": deadline})
    ident = sent.json()["id"]
    status = http.get(f"/messages/{ident}", headers=PARTNER).json()
    assert status["expiresAt"].startswith(deadline[:19])
    wait_for(lambda: _state(runtime, ident) == "delivered", timeout=30, what="delivered")
    assert http.delete(f"/messages/{ident}", headers=OTHER_PARTNER).status_code == 404
    refused = http.delete(f"/messages/{ident}", headers=PARTNER)
    assert refused.status_code == 409
    assert refused.json()["errors"][0]["errorCode"] == "NOT_CANCELLABLE"
    assert _state(runtime, ident) == "delivered"
    assert http.delete("/messages/nosuchmessage", headers=OPERATOR).status_code == 404


def test_python_producers_get_the_same_rules(runtime: Any, user_id: str) -> None:
    later = datetime.now(UTC) + timedelta(hours=1)
    one = tasks.enqueue(user_id, "s-1", "welcome", URL, idempotency_key="py-1", expires_at=later)
    assert (
        tasks.enqueue(user_id, "s-1", "welcome", URL, idempotency_key="py-1", expires_at=later)
        == one
    )
    with pytest.raises(tasks.IdempotencyConflict) as conflict:
        tasks.enqueue(user_id, "s-2", "welcome", URL, idempotency_key="py-1", expires_at=later)
    assert conflict.value.existing_id == one
    assert runtime.store.status(one)["exp"] == str(int(later.timestamp() * 1000))
    for bad in (datetime.now() + timedelta(hours=1), datetime.now(UTC) - timedelta(seconds=1)):
        with pytest.raises(InvalidRequest) as refused:
            tasks.enqueue(user_id, "s-3", "welcome", URL, expires_at=bad)
        assert refused.value.problems[0].code == "INVALID_DEADLINE"
    rows = tasks.enqueue_many(
        [(user_id, "s-4", "welcome", None, "row-1"), (user_id, "s-5", "welcome", None)]
    )
    assert tasks.enqueue_many([(user_id, "s-4", "welcome", None, "row-1")]) == rows[:1]


# -- deadlines and cancel with workers of this test's own -----------------------------------------


@pytest.fixture
def own_api(isolated: Isolated, runtime: Any) -> Iterator[str]:
    """The HTTP service over the isolated database."""
    from worker.front.api import create_app

    settings = harness.app_settings(
        redis_url=isolated.env["NOTIFY_REDIS_URL"], queue_name=isolated.env["NOTIFY_QUEUE_NAME"]
    )
    with ServerThread(create_app(settings, isolated.runtime)) as running:
        yield running.url


def _worker_env(isolated: Isolated, api: Any, **extra: str) -> dict[str, str]:
    return {**isolated.env, "NOTIFY_API_BASE_URL": api.url, **extra}


def _enqueue_expiring(isolated: Isolated, user_id: str, in_ms: int) -> tuple[str, int]:
    """Queue a message through the Python producer with a deadline ``in_ms`` from now: its id,
    and the deadline in epoch milliseconds."""
    deadline = now_ms() + in_ms
    ident = tasks.enqueue(
        user_id,
        "s-1",
        "welcome",
        URL,
        runtime=isolated.runtime,
        expires_at=datetime.fromtimestamp(deadline / 1000, UTC),
    )
    return ident, deadline


def _dead_when(isolated: Isolated, ident: str) -> Any:
    letter = isolated.runtime.deadletters.get(ident)
    return letter if letter is not None else None


def test_a_message_behind_an_open_breaker_expires_on_time_and_is_never_posted(
    isolated: Isolated, start_worker: Any, api: Any, user_id: str
) -> None:
    env = _worker_env(isolated, api, NOTIFY_BREAKER_ENABLED="true")
    start_worker("expiry-breaker", **env)
    breaker = Breaker(isolated.runtime.redis, BreakerPolicy(enabled=True))
    breaker.force_open()  # an operator's stop: every post waits (re-checked every 5 s)
    ident, deadline = _enqueue_expiring(isolated, user_id, 4000)
    wait_for(lambda: _state(isolated.runtime, ident) == "retrying", timeout=20, what="paused")
    letter = wait_for(lambda: _dead_when(isolated, ident), timeout=30, what="the dead letter")
    assert letter.reason == "expired" and letter.attempts == 0
    # On time: not before its deadline, and within the mover's look after it (generous here).
    assert deadline <= letter.dead_ms <= deadline + 10_000
    assert api.requests(user_id=user_id) == []
    assert _state(isolated.runtime, ident) == "failed"


def test_a_message_waiting_out_its_backoff_expires_at_its_deadline(
    isolated: Isolated, start_worker: Any, api: Any, user_id: str
) -> None:
    # The next attempt would be a minute away; the deadline is in twelve seconds (room for the
    # first attempt on a busy machine: one made past the deadline would not be this case).
    api.script([], user_id=user_id, then={"status": 503})
    env = _worker_env(
        isolated,
        api,
        NOTIFY_BACKOFF_BASE_SECONDS="60",
        NOTIFY_BACKOFF_MAX_SECONDS="60",
        NOTIFY_MAX_ATTEMPTS="8",
    )
    start_worker("expiry-retry", **env)
    ident, deadline = _enqueue_expiring(isolated, user_id, 12_000)
    wait_for(lambda: _state(isolated.runtime, ident) == "retrying", timeout=20, what="a retry")
    record = isolated.runtime.store.status(ident)
    assert int(record["next"]) == deadline  # not a minute away
    letter = wait_for(lambda: _dead_when(isolated, ident), timeout=30, what="the dead letter")
    assert letter.reason == "expired" and letter.attempts == 1
    assert deadline <= letter.dead_ms <= deadline + 10_000
    assert len(api.requests(user_id=user_id)) == 1


def test_a_message_cancelled_before_its_post_is_never_posted_though_its_task_is_queued(
    isolated: Isolated, own_api: str, start_worker: Any, api: Any, user_id: str
) -> None:
    with httpx.Client(base_url=own_api, timeout=30) as client:
        sent = _post(client, user_id, request_body())
        ident = sent.json()["id"]
        # No worker yet: its task waits on the queue (published at intake).
        wait_for(
            lambda: isolated.runtime.redis.llen(isolated.env["NOTIFY_QUEUE_NAME"]) > 0,
            timeout=10,
            what="the task on the queue",
        )
        cancelled = client.delete(f"/messages/{ident}", headers=PARTNER)
        assert cancelled.status_code == 200, cancelled.text
        assert (cancelled.json()["status"], cancelled.json()["state"]) == ("cancelled", "cancelled")
        assert client.delete(f"/messages/{ident}", headers=PARTNER).status_code == 200
        worker = start_worker("cancel", **_worker_env(isolated, api))
        wait_for(
            lambda: f"message {ident}: done (cancelled)" in worker.log(),
            timeout=30,
            what="the worker to refuse the cancelled message's task",
        )
        assert api.requests(user_id=user_id) == []
        assert client.get(f"/messages/{ident}", headers=PARTNER).json()["status"] == "cancelled"


def test_the_cli_sends_with_a_deadline_and_a_key_and_cancels(runtime: Any, user_id: str) -> None:
    from click.testing import CliRunner

    from worker.front.cli import main as notify_cli

    cli = CliRunner()
    later = _iso(now_ms() + 3_600_000)
    send = ["send", user_id, "--session", "s-cli", "--template", "welcome"]
    keyed = [*send, "--expires-at", later, "--idempotency-key", f"cli-{user_id}"]
    sent = cli.invoke(notify_cli, keyed)
    assert sent.exit_code == 0, sent.output
    ident = sent.stdout.strip().splitlines()[-1]
    assert runtime.store.status(ident)["exp"] == str(deadlines_ms(later))
    again = cli.invoke(notify_cli, keyed)
    assert (again.exit_code, again.stdout.strip().splitlines()[-1]) == (0, ident)
    other = [*send[:3], "s-other", *send[4:], "--idempotency-key", f"cli-{user_id}"]
    conflict = cli.invoke(notify_cli, other)
    assert conflict.exit_code == 5 and ident in conflict.output
    naive = cli.invoke(notify_cli, [*send, "--expires-at", "2026-12-01T10:00:00"])
    assert naive.exit_code == 1 and "INVALID_DEADLINE" not in naive.output  # a sentence, no code
    assert "time zone" in naive.output
    # Cancel: one recorded without a task (nothing takes it first), a dead letter, an unknown.
    waiting = Message.create(user_id, "s-cancel", "welcome")
    runtime.store.create(waiting.id, waiting.to_wire())
    cancelled = cli.invoke(notify_cli, ["cancel", waiting.id])
    assert cancelled.exit_code == 0 and "cancelled" in cancelled.output
    assert _state(runtime, waiting.id) == "cancelled"
    letter = harness.dead_letter(runtime, user_id)
    assert cli.invoke(notify_cli, ["cancel", letter]).exit_code == 5
    assert cli.invoke(notify_cli, ["cancel", "nosuchmessage"]).exit_code == 4


def deadlines_ms(text: str) -> int:
    parsed = datetime.fromisoformat(text)
    return int(parsed.timestamp() * 1000)
