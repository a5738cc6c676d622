"""Faults with real processes: every accepted request ends exactly once, delivered or dead-lettered.

Each scenario runs real ``celery worker`` subprocesses on a Redis database and queue of its own
(the ``isolated`` fixture; the Redis-restart scenario on a private ``redis-server``), against a
sandbox of its own, sends a few hundred requests, causes its fault mid-run, waits for the system
to settle and then ``reconcile``s: the sandbox's record against the status records and dead
letters. Nothing missing, nothing delivered twice, every dead letter once with the expected reason.
"""

from __future__ import annotations

import base64
import collections
import json
import signal
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from sandbox.concur import Sandbox
from sandbox.redisserver import EmbeddedRedis
from tests.harness import (
    OPERATOR_KEY,
    TEST_TOKEN,
    Isolated,
    free_port,
    wait_for,
)
from tests.reconcile import (
    FAST,
    GATEWAY_KEY,
    REFUSED,
    URL,
    ApiService,
    assert_all_accounted,
    delivered_count,
    expect,
    ids_of,
    reconcile,
    refused_requests,
    requests_for,
    restart,
    settle,
    sigkill,
    states,
    workers_env,
)
from worker.runtime import Runtime
from worker.settings import load_settings
from worker.store.deadletters import DeadLetterFilter

FLAPPING = {"errorRatio": 0.3, "statuses": [500, 503, 504], "hangRatio": 0.02}


# -- 1. SIGKILL ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sigkilled_worker_messages_are_finished_by_the_others_exactly_once(
    start_worker, isolated: Isolated, api: Sandbox
):
    # Some answers hang past the timeout, so the killed worker holds posts in flight as well as
    # prefetched tasks when it dies.
    api.script(rate={"errorRatio": 0.0, "statuses": [503], "hangRatio": 0.05})
    env = workers_env(isolated, api)
    doomed = start_worker("kill-a", **env)
    start_worker("kill-b", **env)
    good = requests_for(360)
    refused = refused_requests(api, 40)
    sent = good + refused
    ids = isolated.enqueue_many(sent)
    wait_for(lambda: delivered_count(isolated.runtime, ids) >= 60, timeout=60, what="deliveries")
    killed = [sigkill(doomed)]
    assert delivered_count(isolated.runtime, ids) < len(good), "everything finished before the kill"
    restart(doomed)
    settle(isolated.runtime, ids, timeout=120)
    result = reconcile(isolated.runtime, api, sent, expect(refused, REFUSED), killed_at=killed)
    # A post answered 2xx in the instant before the kill, whose answer the worker never
    # recorded, is posted again after its lease: at most the posts the killed worker had in
    # flight, one per message of each batch its threads held (at-least-once's honest bound).
    in_flight = int(FAST["NOTIFY_WORKER_CONCURRENCY"]) * load_settings().batch_size
    assert_all_accounted(result, excused_at_most=in_flight)
    assert len(result.dead) == len(refused)


# -- 2. SIGTERM ------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sigterm_mid_flight_finishes_or_hands_back_every_message_exactly_once(
    start_worker, isolated: Isolated, api: Sandbox
):
    # Slow answers keep posts in flight when the signal lands; a warm shutdown finishes them.
    # Few threads, so most tasks are still waiting (prefetched or queued) and are handed back.
    api.script([], then={"status": 200, "delayMs": 300})
    env = workers_env(isolated, api, NOTIFY_WORKER_CONCURRENCY="4")
    stopping = start_worker("term-a", **env)
    good = requests_for(300)
    refused = refused_requests(api, 30)
    sent = good + refused
    ids = isolated.enqueue_many(sent)
    wait_for(lambda: delivered_count(isolated.runtime, ids) >= 40, timeout=60, what="deliveries")
    stopping.signal(signal.SIGTERM)
    assert stopping.process is not None
    stopping.process.wait(timeout=60)
    assert delivered_count(isolated.runtime, ids) < len(good), "everything finished first"
    assert "Warm shutdown" in stopping.log()
    start_worker("term-b", **env)
    settle(isolated.runtime, ids, timeout=120)
    result = reconcile(isolated.runtime, api, sent, expect(refused, REFUSED))
    assert_all_accounted(result)
    assert len(result.dead) == len(refused)


# -- 3. Redis restart ------------------------------------------------------------------------------


@pytest.fixture
def private_redis() -> Iterator[EmbeddedRedis]:
    """A ``redis-server`` of this test's own (AOF on), which it may restart."""
    server = EmbeddedRedis(port=free_port())
    server.start()
    yield server
    server.stop()


@pytest.mark.slow
def test_redis_restart_loses_nothing_and_workers_and_service_reconnect(
    private_redis: EmbeddedRedis, start_worker, api: Sandbox, worker_logs: Path
):
    # private_redis first: it is stopped after the workers, who then stop warm, not in 30 s.
    url = private_redis.url
    chosen = Isolated(url)
    try:
        env = workers_env(chosen, api)
        # Queued, waiting for retry and in flight at the restart: slow answers hold posts in
        # flight, one user in three is answered 503 twice first, and the queue is long.
        api.configure(latency_ms=50)
        start_worker("redis-a", **env)
        start_worker("redis-b", **env)
        service = ApiService(env, worker_logs / "redis-api.log")
        try:
            good = requests_for(300, users=30)
            for user in sorted({r[0] for r in good})[::3]:
                api.script([{"status": 503}, {"status": 503}], user_id=user)
            before, after = good[:150], good[150:]
            ids = chosen.enqueue_many(before[:100])
            assert set(service.send(before[100:])) == {202}
            wait_for(
                lambda: delivered_count(chosen.runtime, ids) >= 20, timeout=60, what="deliveries"
            )
            states_then = collections.Counter(states(chosen.runtime, ids_of(before)))
            private_redis.restart(down_seconds=3)
            # The service answers 503 while Redis is away and recovers by itself.
            wait_for(service.ready, timeout=60, what="the service to be ready again")
            assert set(service.send(after)) == {202}
            settle(chosen.runtime, ids_of(good), timeout=150)
            result = reconcile(chosen.runtime, api, good)
            assert_all_accounted(result)
            assert states_then["delivered"] < len(before), f"nothing was pending: {states_then}"
        finally:
            service.stop()
    finally:
        chosen.runtime.close()


# -- 4. the API flaps ------------------------------------------------------------------------------


@pytest.mark.slow
def test_flapping_api_with_hangs_delivers_everything_once(
    start_worker, isolated: Isolated, api: Sandbox
):
    api.script(rate=FLAPPING)
    env = workers_env(isolated, api)
    start_worker("flap-a", **env)
    start_worker("flap-b", **env)
    good = requests_for(360)
    refused = refused_requests(api, 40)
    sent = good + refused
    ids = isolated.enqueue_many(sent)
    settle(isolated.runtime, ids, timeout=150)
    # Eight attempts at 32 % failure each: exhausting them is possible (about 1 in 10 000).
    result = reconcile(
        isolated.runtime,
        api,
        sent,
        {**expect(good, "delivered", "retries_exhausted"), **expect(refused, REFUSED)},
    )
    assert_all_accounted(result)
    by_status = api.stats()["byStatus"]
    assert {"500", "503", "504"} <= set(by_status), by_status
    assert api.stats()["hung"] > 0


# -- 5. the API down for longer than the retry window ----------------------------------------------


@pytest.mark.slow
def test_api_down_past_the_retry_window_dead_letters_all_then_bulk_replay_delivers_all(
    start_worker, isolated: Isolated, api: Sandbox
):
    api.script([], then={"status": 503})
    env = workers_env(isolated, api, NOTIFY_MAX_ATTEMPTS="3")
    start_worker("down-a", **env)
    sent = requests_for(300)
    ids = isolated.enqueue_many(sent)
    settle(isolated.runtime, ids, timeout=120)
    exhausted = reconcile(isolated.runtime, api, sent, expect(sent, "retries_exhausted"))
    assert_all_accounted(exhausted)
    assert len(exhausted.dead) == len(sent)
    assert api.stats()["byStatus"] == {"503": 3 * len(sent)}

    api.clear_scripts()
    replayed = isolated.runtime.deadletters.replay_many(
        DeadLetterFilter(reason="retries_exhausted")
    )
    assert sorted(replayed) == sorted(ids)
    settle(isolated.runtime, ids, timeout=120)
    result = reconcile(isolated.runtime, api, sent)
    assert_all_accounted(result)
    assert len(result.delivered) == len(sent)
    assert isolated.runtime.deadletters.count() == 0


# -- 6. the token endpoint fails -------------------------------------------------------------------


@pytest.mark.slow
def test_token_endpoint_outage_defers_messages_and_dead_letters_none(
    start_worker, isolated: Isolated
):
    # Only access tokens from the sandbox's token endpoint are accepted. Six failures, one per
    # cool-down (2 s): about 12 s without a token, far past 3 attempts at 0.2-1 s backoff.
    with Sandbox(tokens=[f"static-{uuid.uuid4().hex}"]) as api:
        api.configure_oauth(failures=[503, 503, 502, 503, 504, 503])
        env = workers_env(
            isolated,
            api,
            NOTIFY_MAX_ATTEMPTS="3",
            NOTIFY_VISIBILITY_TIMEOUT_SECONDS="30",  # the lease covers two token fetches
            NOTIFY_API_TOKEN="",
            NOTIFY_OAUTH_CLIENT_ID=f"client-{uuid.uuid4().hex[:8]}",
            NOTIFY_OAUTH_CLIENT_SECRET="sandbox-client-secret",
            NOTIFY_OAUTH_COMPANY_ID="sandbox-company",
            NOTIFY_OAUTH_COMPANY_AUTH_TOKEN="sandbox-auth-token",
            # Required with OAuth (issue 11, item 6).
            NOTIFY_TOKEN_ENCRYPTION_KEY="k2y0Ue3MSn3kQ1Yv2c0Jv8wH8d7c3mB0s9J0b1zR6dE=",
        )
        worker = start_worker("token-a", **env)
        sent = requests_for(300)
        ids = isolated.enqueue_many(sent)
        settle(isolated.runtime, ids, timeout=150)
        result = reconcile(isolated.runtime, api, sent)
        assert_all_accounted(result)
        assert isolated.runtime.deadletters.count() == 0
        deferred = [
            sum(
                a["cause"] == "token_unavailable"
                for a in (isolated.runtime.store.status(i) or {}).get("attempts", [])
            )
            for i in ids
        ]
        assert max(deferred) > 3, "no message waited longer than its retries would have"
        assert api.oauth_stats()["failuresLeft"] == 0
        log = worker.log()
        for secret in ["sandbox-client-secret", "sandbox-auth-token", *api.issued_tokens()]:
            assert secret not in log


# -- 7. poison messages ----------------------------------------------------------------------------


def raw_broker_message(isolated: Isolated, args: Any, kwargs: Any, task: str | None = None) -> dict:
    """A message exactly as kombu puts it on a Redis list, made by Celery itself."""
    from worker.queue.config import SEND_TASK, make_app

    scratch = f"scratch-{uuid.uuid4().hex[:8]}"
    app = make_app(load_settings(redis_url=isolated.env["NOTIFY_REDIS_URL"], queue_name=scratch))
    app.send_task(task or SEND_TASK, args=args, kwargs=kwargs, queue=scratch)
    raw = isolated.runtime.redis.rpop(scratch)
    assert raw is not None
    return json.loads(raw)


def push_raw(isolated: Isolated, message: dict | bytes) -> None:
    """LPUSH straight onto the worker's queue list, as a broken producer would."""
    data = message if isinstance(message, bytes) else json.dumps(message).encode()
    isolated.runtime.redis.lpush(isolated.env["NOTIFY_QUEUE_NAME"], data)


def with_body(message: dict, body: bytes) -> dict:
    """The same message carrying another (base64-encoded) body."""
    return {**message, "body": base64.b64encode(body).decode()}


def letters_with(runtime: Runtime, marker: str) -> list[Any]:
    return [
        letter
        for letter in map(runtime.deadletters.get, runtime.deadletters.select(DeadLetterFilter()))
        if letter is not None and marker in json.dumps(letter.request)
    ]


POISON: dict[str, Callable[[Isolated, str], dict | bytes]] = {
    "undecodable_json_body": lambda iso, m: with_body(
        raw_broker_message(iso, [{}], {}), f'[[{{"{m}": '.encode() + b"\xff\xfe not json"
    ),
    "body_not_utf8": lambda iso, m: with_body(
        raw_broker_message(iso, [{}], {}), m.encode() + b"\xc3\x28\xa0\xa1"
    ),
    "wrong_types": lambda iso, m: raw_broker_message(iso, [{"id": 5, "gen": "1", "req": [m]}], {}),
    "unknown_task_arguments": lambda iso, m: raw_broker_message(iso, [m], {"surprise": m}),
    "not_an_object": lambda iso, m: raw_broker_message(iso, [m, 7, None], {}),
    "unknown_task_name": lambda iso, m: raw_broker_message(iso, [m], {}, task="tasks.nope"),
    "huge_fields": lambda iso, m: raw_broker_message(
        iso,
        [
            {
                "req": {
                    "userId": m,
                    "sessionId": "s" * 1_000_000,
                    "templateId": "welcome",
                    "context": {"url": "https://app.example.com/" + "x" * 1_000_000},
                }
            }
        ],
        {},
    ),
}


@pytest.mark.slow
def test_poison_messages_on_the_queue_are_dead_lettered_and_the_worker_keeps_going(
    start_worker, isolated: Isolated, api: Sandbox
):
    worker = start_worker("poison-a", **workers_env(isolated, api))
    first = requests_for(150)
    ids = isolated.enqueue_many(first)
    markers = {name: f"poison-{name}-{uuid.uuid4().hex[:8]}" for name in POISON}
    for name, make in POISON.items():
        push_raw(isolated, make(isolated, markers[name]))
    then = requests_for(150)
    ids += isolated.enqueue_many(then)
    settle(isolated.runtime, ids, timeout=90)
    assert_all_accounted(reconcile(isolated.runtime, api, first + then))
    expected = {
        # Refused by size before it is stored anywhere (envelopes.MAX_REQUEST_BYTES).
        "huge_fields": "malformed_message",
    }
    for name, marker in markers.items():
        letters = wait_for(
            lambda marker=marker: letters_with(isolated.runtime, marker),
            timeout=30,
            what=f"the dead letter of {name}",
        )
        assert len(letters) == 1, name
        assert letters[0].reason == expected.get(name, "malformed_message"), name
    assert worker.process is not None and worker.process.poll() is None
    # Nothing is left on the queue or unacknowledged.
    assert isolated.runtime.redis.llen(isolated.env["NOTIFY_QUEUE_NAME"]) == 0


# -- secrets ---------------------------------------------------------------------------------------


def test_no_secret_reaches_any_worker_or_service_log(
    start_worker, isolated: Isolated, api: Sandbox, worker_logs: Path
):
    # A 401 makes the worker fetch the token again; bad keys and a partner key on operator
    # endpoints make the service refuse: the paths most likely to echo a secret.
    env = workers_env(isolated, api)
    start_worker("secrets-a", **env)
    user = f"u-{uuid.uuid4().hex[:8]}"
    api.script([{"status": 401}], user_id=user)
    ids = isolated.enqueue_many([(user, "s-1", "welcome", URL)])
    service = ApiService(env, worker_logs / "secrets-api.log")
    try:
        with httpx.Client(base_url=service.url, timeout=10) as client:
            for key in (GATEWAY_KEY, OPERATOR_KEY + "x", "not-a-key"):
                answer = client.get("/notifications", headers={"Authorization": f"Bearer {key}"})
                assert answer.status_code in (401, 403)
                assert GATEWAY_KEY not in answer.text and OPERATOR_KEY not in answer.text
            assert client.get("/notifications").status_code == 401
            bad = client.post(
                f"/messages/{user}/session",
                headers={"Authorization": f"Bearer {OPERATOR_KEY}"},
                content=b"{",
            )
            assert bad.status_code == 403 and OPERATOR_KEY not in bad.text
        settle(isolated.runtime, ids, timeout=30)
    finally:
        service.stop()
    logs = sorted(worker_logs.glob("*.log"))
    assert logs
    for path in logs:
        text = path.read_text(errors="replace")
        for secret in (TEST_TOKEN, GATEWAY_KEY, OPERATOR_KEY):
            assert secret not in text, f"a secret in {path.name}"
