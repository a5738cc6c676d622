"""Structured logs and Sentry, with real workers: what is logged and reported, and no secret
(the redaction itself, in this process: tests/unit/test_redaction.py)."""

from __future__ import annotations

import json
import uuid
from typing import Any

from tests.harness import TEST_TOKEN, Isolated, SentryRecorder, wait_for

URL = "https://app.example.com/x"


def _session() -> str:
    return f"s-{uuid.uuid4().hex[:8]}"


# -- logs ------------------------------------------------------------------------------------


def _json_lines(text: str) -> list[dict[str, Any]]:
    lines = []
    for line in text.splitlines():
        if line.startswith("{"):
            lines.append(json.loads(line))
    return lines


def test_a_worker_logs_one_json_line_per_attempt_with_the_message_fields(
    start_worker, isolated: Isolated, sandbox, user_id
):
    sandbox.script([{"status": 503}], user_id=user_id, then={"status": 200})
    worker = start_worker("logs", **isolated.env)
    [message_id] = isolated.enqueue_many([(user_id, _session(), "welcome", URL)])
    wait_for(lambda: isolated.state(message_id) == "delivered", timeout=20, what="delivery")

    def logged() -> list[dict[str, Any]]:
        text = worker.log()
        complete = text[: text.rfind("\n") + 1]  # not a line still being written
        return [
            line
            for line in _json_lines(complete)
            if line.get("message_id") == message_id and line["logger"] == "notify.delivery"
        ]

    # The worker records the outcome in Redis, then logs it: the delivered line may come a
    # moment after the state the wait above saw.
    attempts = wait_for(
        lambda: (found := logged()) and found[-1]["outcome"] == "delivered" and found,
        timeout=20,
        what="the delivered attempt's log line",
    )
    seen = sandbox.requests(user_id=user_id)
    assert [(a["outcome"], a["attempt"], a["status"]) for a in attempts] == [
        ("retry", 1, 503),
        ("delivered", 2, 200),
    ]
    for line, request in zip(attempts, seen, strict=True):
        assert line["user_id"] == user_id
        assert line["template_id"] == "welcome"
        assert line["correlation_id"] == request["correlationId"]
        assert isinstance(line["duration_ms"], int) and line["duration_ms"] >= 0
        assert line["level"] == "INFO" and line["time"].endswith("+00:00")
    # Celery's own lines come through the same formatter.
    assert any(line["logger"].startswith("celery.") for line in _json_lines(worker.log()))
    # httpx's per-request INFO line duplicates ours and is kept quiet.
    assert "HTTP Request:" not in worker.log()
    assert TEST_TOKEN not in worker.log()


# -- Sentry, end to end ----------------------------------------------------------------------


def _mentions(event: dict[str, Any], text: str) -> bool:
    return text in json.dumps(event)


def test_sentry_gets_one_event_for_exhausted_retries_none_for_a_400_and_no_secret(
    start_worker, isolated: Isolated, sandbox, sentry: SentryRecorder
):
    flaky, refused = f"user-{uuid.uuid4().hex[:10]}", f"user-{uuid.uuid4().hex[:10]}"
    sandbox.script([], user_id=flaky, then={"status": 503})
    sandbox.script([{"status": 400}], user_id=refused)
    worker = start_worker(
        "sentry",
        NOTIFY_SENTRY_DSN=sentry.dsn,
        NOTIFY_SENTRY_ENVIRONMENT="test-env",
        **isolated.env,
    )
    exhausted, rejected = isolated.enqueue_many(
        [(flaky, _session(), "welcome", URL), (refused, _session(), "welcome", URL)]
    )
    for message_id in (exhausted, rejected):
        wait_for(lambda m=message_id: isolated.state(m) == "failed", timeout=30, what=message_id)
    assert isolated.runtime.deadletters.get(exhausted).reason == "retries_exhausted"
    assert isolated.runtime.deadletters.get(rejected).reason == "api_rejected"

    wait_for(
        lambda: any(_mentions(e, exhausted) for e in sentry.events()),
        timeout=15,
        what="the retries_exhausted event",
    )
    worker.stop()  # SIGTERM: a warm shutdown flushes whatever the SDK still holds

    events = sentry.events()
    assert len(events) == 1, [e.get("logentry") for e in events]
    [event] = events
    assert event["level"] == "error"
    assert event["environment"] == "test-env"
    assert event["tags"]["reason"] == "retries_exhausted"
    assert event["tags"]["template_id"] == "welcome"
    assert event["extra"]["message_id"] == exhausted
    assert not any(_mentions(e, rejected) for e in events)
    assert len(sandbox.requests(user_id=flaky)) == 3  # NOTIFY_MAX_ATTEMPTS in the tests
    everything = b"".join(sentry.bodies)
    assert TEST_TOKEN.encode() not in everything
    assert b"Bearer " not in everything
