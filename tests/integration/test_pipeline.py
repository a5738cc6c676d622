"""The whole delivery path with real parts: producer → Redis → celery worker → sandbox → outcome."""

from __future__ import annotations

import itertools
import json
import uuid
from typing import Any

import pytest

import tasks
from tests.harness import TEST_TOKEN, wait_for
from worker.queue.envelopes import Envelope
from worker.rules.validation import InvalidRequest
from worker.store import keys

pytestmark = pytest.mark.usefixtures("celery_worker_process")


def _state(runtime: Any, message_id: str) -> str | None:
    record = runtime.store.status(message_id)
    return record["state"] if record else None


def _finished(runtime: Any, message_id: str, timeout: float = 20.0) -> dict[str, Any]:
    wait_for(
        lambda: _state(runtime, message_id) in ("delivered", "failed"),
        timeout=timeout,
        what=f"message {message_id} to finish",
    )
    record = runtime.store.status(message_id)
    assert record is not None
    return record


def _send(user_id: str, template: str = "welcome", session: str | None = None, **kw: Any) -> str:
    return tasks.enqueue(
        user_id,
        session or f"s-{uuid.uuid4().hex[:8]}",
        template,
        kw.get("url", "https://app.example.com/reports/1"),
    )


def test_200_is_delivered_once_with_the_seed_body_and_bearer_token(runtime, sandbox, user_id):
    message_id = _send(user_id, session="sess-1")
    record = _finished(runtime, message_id)
    assert record["state"] == "delivered"
    seen = sandbox.requests(user_id=user_id)
    assert len(seen) == 1
    assert seen[0]["body"] == {
        "sessionId": "sess-1",
        "templateId": "welcome",
        "context": {"url": "https://app.example.com/reports/1"},
    }
    assert seen[0]["authorized"] is True
    assert record["cid"] == seen[0]["correlationId"]
    assert [a["outcome"] for a in record["attempts"]] == ["delivered"]


@pytest.mark.parametrize("status", [400, 403, 404])
def test_4xx_is_dead_lettered_at_once_keeping_the_api_errors(runtime, sandbox, user_id, status):
    errors = [{"errorId": "e-1", "errorCode": f"CODE_{status}", "errorMessage": "nope"}]
    sandbox.script([{"status": status, "errors": errors}], user_id=user_id)
    message_id = _send(user_id)
    record = _finished(runtime, message_id)
    assert record["state"] == "failed"
    letter = runtime.deadletters.get(message_id)
    assert letter.reason == "api_rejected"
    assert letter.status == status
    assert letter.errors == errors
    assert letter.attempts == 1
    assert letter.correlation_id == sandbox.requests(user_id=user_id)[0]["correlationId"]
    assert letter.task_id and letter.worker
    assert len(sandbox.requests(user_id=user_id)) == 1


def _retry_delays(worker: Any, message_id: str) -> list[float]:
    """The delays the worker chose for ``message_id``'s retries, from its JSON log lines."""
    text = worker.log()
    complete = text[: text.rfind("\n") + 1]  # not a line still being written
    lines = [
        json.loads(line)
        for line in complete.splitlines()
        if line.startswith("{") and message_id in line  # the session's log is long
    ]
    return [
        line["delay_seconds"]
        for line in lines
        if line.get("message_id") == message_id and line.get("outcome") == "retry"
    ]


@pytest.mark.parametrize("status", [500, 503, 504])
def test_5xx_is_retried_with_growing_delays_then_dead_lettered(
    runtime, sandbox, user_id, status, celery_worker_process
):
    sandbox.script([], user_id=user_id, then={"status": status})
    message_id = _send(user_id)
    record = _finished(runtime, message_id)
    assert record["state"] == "failed"
    attempts = record["attempts"]
    assert [a["outcome"] for a in attempts] == ["retry", "retry", "dead"]
    # Backoff 0.3 s then 0.6 s, less up to 20 % jitter: the second delay is the longer. Checked
    # on the delays the worker chose, not by comparing the gaps between attempts: a gap adds the
    # mover's poll and the pickup, which a loaded machine stretches by more than the 0.18 s at
    # least between the two delays.
    delays = wait_for(
        lambda: len(found := _retry_delays(celery_worker_process, message_id)) == 2 and found,
        what="the two retries' log lines",
    )
    assert 0.24 <= delays[0] <= 0.3 and 0.48 <= delays[1] <= 0.6, delays
    # Each retry waited its delay out (a gap runs from one attempt's start to the next's).
    gaps = [b["at"] - a["at"] for a, b in itertools.pairwise(attempts)]
    assert all(gap >= delay * 1000 - 2 for gap, delay in zip(gaps, delays, strict=True)), gaps
    letter = runtime.deadletters.get(message_id)
    assert letter.reason == "retries_exhausted"
    assert letter.status == status
    assert letter.attempts == 3
    assert len(sandbox.requests(user_id=user_id)) == 3


def test_timeout_is_retried_then_dead_lettered(runtime, sandbox, user_id):
    sandbox.script([], user_id=user_id, then={"status": 200, "delayMs": 2500})
    message_id = _send(user_id)
    record = _finished(runtime, message_id, timeout=30)
    assert [a["cause"] for a in record["attempts"]] == ["timeout"] * 3
    assert runtime.deadletters.get(message_id).reason == "retries_exhausted"


def test_connection_closed_without_an_answer_is_retried_then_delivered_once(
    runtime, sandbox, user_id
):
    sandbox.script([{"status": 200, "drop": True}], user_id=user_id)
    message_id = _send(user_id)
    record = _finished(runtime, message_id)
    assert record["state"] == "delivered"
    assert [(a["outcome"], a["cause"]) for a in record["attempts"]] == [
        ("retry", "protocol"),
        ("delivered", "http_200"),
    ]
    assert [r["status"] for r in sandbox.requests(user_id=user_id)] == [None, 200]


def test_429_retry_after_is_honoured(runtime, sandbox, user_id):
    sandbox.script([{"status": 429, "retryAfter": "2"}], user_id=user_id)
    message_id = _send(user_id)
    record = _finished(runtime, message_id)
    assert record["state"] == "delivered"
    first, second = record["attempts"]
    assert first["status"] == 429
    # Our backoff alone would wait at most 0.3 s; the server asked for 2 s.
    assert second["at"] - first["at"] >= 2000


def test_401_fetches_a_fresh_token_once_and_posts_again_at_once(runtime, sandbox, user_id):
    sandbox.script([{"status": 401}], user_id=user_id)
    message_id = _send(user_id)
    record = _finished(runtime, message_id)
    assert record["state"] == "delivered"
    assert len(record["attempts"]) == 1  # one attempt: the refresh is part of it
    assert [r["status"] for r in sandbox.requests(user_id=user_id)] == [401, 200]


def test_second_401_is_dead_lettered_as_unauthorized(runtime, sandbox, user_id):
    sandbox.script([{"status": 401}, {"status": 401}], user_id=user_id)
    message_id = _send(user_id)
    _finished(runtime, message_id)
    letter = runtime.deadletters.get(message_id)
    assert letter.reason == "unauthorized"
    assert letter.status == 401
    assert len(sandbox.requests(user_id=user_id)) == 2


def test_producer_refuses_invalid_input_and_queues_nothing(runtime, user_id):
    cases = [
        ("", "s", "welcome", None),
        (user_id, "", "welcome", None),
        (user_id, "s", "not-allowed-template", None),
        (user_id, "s", "welcome", "http://app.example.com/x"),
        (user_id, "s", "welcome", "https://app.example.com@evil.example/x"),
    ]
    for case in cases:
        with pytest.raises(InvalidRequest) as caught:
            tasks.enqueue(*case)
        assert caught.value.problems
    assert not runtime.redis.keys(f"{keys.PREFIX}:msg:*{user_id}*")


@pytest.mark.parametrize(
    ("request_", "reason"),
    [
        ({"sessionId": "s", "templateId": "welcome", "context": "x"}, "invalid_request"),
        ({"sessionId": "s", "templateId": "nope", "context": {}}, "template_not_allowed"),
        (
            {"sessionId": "s", "templateId": "welcome", "context": {"url": "https://evil.example"}},
            "url_not_allowed",
        ),
    ],
)
def test_worker_dead_letters_what_the_producer_would_refuse_and_never_sends_it(
    runtime, sandbox, user_id, request_, reason
):
    # Straight onto the queue, bypassing the producer: the queue is not trusted.
    message_id = f"raw{uuid.uuid4().hex[:16]}"
    runtime.publish([Envelope(message_id, 1, {"userId": user_id, **request_})])
    _finished(runtime, message_id)
    letter = runtime.deadletters.get(message_id)
    assert letter.reason == reason
    assert letter.attempts == 1
    assert sandbox.requests(user_id=user_id) == []


def test_malformed_raw_message_on_the_queue_is_dead_lettered(runtime, celery_worker_process):
    from worker.celery_app import SEND_TASK, app

    before = runtime.deadletters.count()
    marker = uuid.uuid4().hex
    app.send_task(SEND_TASK, args=["not an envelope", marker], kwargs={"surprise": 1})
    letter = wait_for(
        lambda: next(
            (
                item
                for item in runtime.deadletters.page(limit=20).items
                if marker in json.dumps(item.request)
            ),
            None,
        ),
        what="the malformed message's dead letter",
    )
    assert letter.reason == "malformed_message"
    assert runtime.deadletters.count() == before + 1
    # The worker keeps going.
    assert celery_worker_process.process.poll() is None


def test_redelivered_task_of_a_delivered_message_is_not_posted_again(runtime, sandbox, user_id):
    message_id = _send(user_id, session="once")
    _finished(runtime, message_id)
    wire = runtime.store.status(message_id)["req"]
    for _ in range(3):  # the broker hands the same task out again
        runtime.publish([Envelope(message_id, 1, json.loads(wire))])
    canary = _send(user_id, session="after")  # queued behind the copies
    _finished(runtime, canary)
    sessions = [r["body"]["sessionId"] for r in sandbox.requests(user_id=user_id)]
    assert sessions.count("once") == 1


def test_same_request_twice_is_one_message(runtime, sandbox, user_id):
    first = tasks.submit(user_id, {"sessionId": "dup", "templateId": "welcome", "context": {}})
    second = tasks.submit(user_id, {"sessionId": "dup", "templateId": "welcome", "context": {}})
    assert first.id == second.id
    assert (first.duplicate, second.duplicate) == (False, True)
    _finished(runtime, first.id)
    assert len(sandbox.requests(user_id=user_id)) == 1


def test_replayed_dead_letter_is_delivered_once_the_api_answers_200(runtime, sandbox, user_id):
    sandbox.script([{"status": 404}], user_id=user_id)
    message_id = _send(user_id)
    _finished(runtime, message_id)
    assert runtime.deadletters.get(message_id) is not None
    assert runtime.deadletters.replay(message_id) is not None
    wait_for(lambda: _state(runtime, message_id) == "delivered", what="the replay to deliver")
    record = runtime.store.status(message_id)
    assert record["replays"] == "1"
    assert runtime.deadletters.get(message_id) is None
    assert [r["status"] for r in sandbox.requests(user_id=user_id)] == [404, 200]


def test_token_never_reaches_records_or_dead_letters(runtime, sandbox, user_id):
    sandbox.script([{"status": 400}], user_id=user_id)
    message_id = _send(user_id)
    _finished(runtime, message_id)
    dump = json.dumps(
        [runtime.store.status(message_id), runtime.deadletters.get(message_id).to_dict()]
    )
    assert TEST_TOKEN not in dump


# -- inputs that would change what is sent (issue 11, items 3, 5, 11) --------------------------


@pytest.mark.parametrize("dots", [".", "..", "..."])
def test_producer_refuses_a_dot_only_user_id(runtime, dots):
    # ".." would make the worker post to /notifications/v4/session, outside /messages/.
    session = f"s-{uuid.uuid4().hex[:8]}"
    with pytest.raises(InvalidRequest) as caught:
        tasks.enqueue(dots, session, "welcome", None)
    assert [p.code for p in caught.value.problems] == ["INVALID_USER_ID"]
    assert "dots" in caught.value.problems[0].message
    with pytest.raises(InvalidRequest):
        tasks.submit(dots, {"sessionId": session, "templateId": "welcome", "context": {}})
    assert not [
        key for key in runtime.redis.scan_iter(match=keys.message("*")) if session in str(key)
    ]


@pytest.mark.parametrize("dots", [".", ".."])
def test_worker_dead_letters_a_dot_only_user_id_and_posts_nothing(runtime, sandbox, dots):
    # Straight onto the queue, bypassing the producer: the worker checks again.
    session = f"s-{uuid.uuid4().hex[:8]}"
    message_id = f"raw{uuid.uuid4().hex[:16]}"
    request = {"userId": dots, "sessionId": session, "templateId": "welcome", "context": {}}
    runtime.publish([Envelope(message_id, 1, request)])
    _finished(runtime, message_id)
    letter = runtime.deadletters.get(message_id)
    assert letter.reason == "invalid_request" and letter.attempts == 1
    seen = [r for r in sandbox.requests() if (r["body"] or {}).get("sessionId") == session]
    assert seen == []  # neither at /messages/../session nor at /session


@pytest.mark.parametrize(
    "url",
    [
        'https://app.example.com/a"onmouseover="x',
        "https://app.example.com/<script>",
        "https://app.example.com/p?q={x}",
        "https://app.example.com/p#a|b",
        "https://app.example.com/caf\u00e9",
        "https://app.example.com/p?q=a^b",
        "https://app.example.com/p?q=`x`",
    ],
)
def test_producer_refuses_a_url_with_characters_not_valid_in_a_uri(runtime, user_id, url):
    with pytest.raises(InvalidRequest) as caught:
        tasks.enqueue(user_id, "s", "welcome", url)
    [problem] = caught.value.problems
    assert problem.code == "URL_NOT_ALLOWED"
    assert "not valid in a URI" in problem.message and "percent-encode" in problem.message
    assert not runtime.redis.keys(f"{keys.PREFIX}:msg:*{user_id}*")


def test_worker_dead_letters_a_url_with_characters_not_valid_in_a_uri(runtime, sandbox, user_id):
    message_id = f"raw{uuid.uuid4().hex[:16]}"
    request = {
        "userId": user_id,
        "sessionId": "s",
        "templateId": "welcome",
        "context": {"url": "https://app.example.com/<img src=x>"},
    }
    runtime.publish([Envelope(message_id, 1, request)])
    _finished(runtime, message_id)
    assert runtime.deadletters.get(message_id).reason == "url_not_allowed"
    assert sandbox.requests(user_id=user_id) == []


def test_producer_reports_at_most_20_problems_and_counts_the_rest(user_id):
    body = {f"unknown{i}": i for i in range(3000)}
    with pytest.raises(InvalidRequest) as caught:
        tasks.submit(user_id, body)
    problems = caught.value.problems
    assert len(problems) == 21
    assert problems[-1].code == "TOO_MANY_ERRORS"
    # 3000 unknown fields and 3 missing ones: 20 listed, the other 2983 counted.
    assert problems[-1].message.startswith("2983 more problems not listed")
    assert len(str(caught.value)) < 4000
