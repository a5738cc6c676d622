"""Structured logs and Sentry, with real workers: what is logged and reported, and no secret."""

from __future__ import annotations

import gzip
import io
import json
import logging
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from tests.harness import TEST_TOKEN, Isolated, wait_for
from worker.ops.logs import JsonFormatter, RedactingFilter, add_secret, redact, settings_secrets
from worker.ops.monitoring import scrub
from worker.settings import load_settings

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

    attempts = [
        line
        for line in _json_lines(worker.log())
        if line.get("message_id") == message_id and line["logger"] == "notify.delivery"
    ]
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


def _render(message: str, *args: Any, **extra: Any) -> dict[str, Any]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RedactingFilter())
    logger = logging.getLogger(f"test.{uuid.uuid4().hex}")
    logger.propagate = False
    logger.addHandler(handler)
    try:
        raise RuntimeError(f"boom with {TEST_TOKEN}")
    except RuntimeError:
        logger.error(message, *args, exc_info=True, extra=extra)
    line = stream.getvalue()
    assert line.count("\n") == 1  # one line, traceback included
    doc: dict[str, Any] = json.loads(line)
    return doc


def test_log_lines_never_carry_a_bearer_token_or_a_registered_secret():
    add_secret(TEST_TOKEN, "partner-key-0123456789")
    doc = _render(
        "headers %s and key %s",
        {"Authorization": "Bearer eyJ.some.jwt"},
        "partner-key-0123456789",
        body=f"refresh_token={TEST_TOKEN}&x=1",
        message_id="m-1",
    )
    rendered = json.dumps(doc)
    assert TEST_TOKEN not in rendered
    assert "eyJ.some.jwt" not in rendered
    assert "partner-key-0123456789" not in rendered
    assert doc["message"] == ("headers {'Authorization': 'Bearer [REDACTED]'} and key [REDACTED]")
    assert doc["message_id"] == "m-1"
    assert doc["body"] == "refresh_token=[REDACTED]&x=1"
    assert "RuntimeError: boom with [REDACTED]" in doc["exception"]


def test_redact_leaves_ordinary_text_alone_and_hides_url_credentials():
    assert redact("delivered m-1 attempt=2 status=200") == "delivered m-1 attempt=2 status=200"
    assert redact("redis://:s3cretpw@redis:6379/0") == "redis://[REDACTED]@redis:6379/0"


def test_redact_hides_the_oauth_scheme_but_not_the_word():
    # Issue 11, item 7: Concur's legacy "Authorization: OAuth <token>" was left as it was.
    jwt = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl-_x"
    assert redact(f"Authorization: OAuth {jwt}") == "Authorization: OAuth [REDACTED]"
    assert jwt not in redact(f"headers {{'authorization': 'oauth {jwt}'}}")
    text = "Concur OAuth token refresh failed: OAuth client not configured"
    assert redact(text) == text


def test_runtime_secrets_are_bounded_to_the_latest():
    from worker.ops import logs

    first = "runtime-token-000000"
    logs.add_runtime_secret(first)
    assert redact(first) == "[REDACTED]"
    for n in range(1, logs.MAX_RUNTIME_SECRETS + 1):
        logs.add_runtime_secret(f"runtime-token-{n:06d}")
    assert redact(first) == first  # long expired: no longer scanned for
    assert redact(f"runtime-token-{logs.MAX_RUNTIME_SECRETS:06d}") == "[REDACTED]"


def test_sentry_scrub_removes_headers_bodies_and_secret_values():
    add_secret(TEST_TOKEN)
    event = {
        "message": f"failed with {TEST_TOKEN}",
        "request": {
            "headers": {"Authorization": "Bearer abc.def", "Accept": "application/json"},
            "data": {"password": "pw-123456", "refresh_token": "rt-123456", "userId": "u-1"},
        },
        "exception": {
            "values": [
                {
                    "value": "401 for Bearer abc.def",
                    "stacktrace": {"frames": [{"vars": {"token": "'tok-xyz'", "n": "1"}}]},
                }
            ]
        },
        "breadcrumbs": {"values": [{"message": f"Authorization: Bearer {TEST_TOKEN}"}]},
        "extra": {"reason": "retries_exhausted", "template_id": "welcome"},
    }
    cleaned = scrub(event, {})
    text = json.dumps(cleaned)
    for secret in (TEST_TOKEN, "abc.def", "pw-123456", "rt-123456", "tok-xyz"):
        assert secret not in text
    assert cleaned["request"]["headers"]["Accept"] == "application/json"
    assert cleaned["request"]["data"]["userId"] == "u-1"
    assert cleaned["tags"] == {"reason": "retries_exhausted", "template_id": "welcome"}


# -- Sentry, end to end ----------------------------------------------------------------------


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


def test_every_secret_setting_is_on_the_redaction_list():
    settings = load_settings(
        sentry_dsn="https://abcdef123456@sentry.example/1",
        flower_basic_auth="ops:flower-pw-123",
        redis_url="redis://:redis-pw-123@redis:6379/0",
        operator_keys="operator-key-0123456789abcdef",
    )
    secrets = set(settings_secrets(settings))
    assert {
        TEST_TOKEN,
        "https://abcdef123456@sentry.example/1",
        "abcdef123456",
        "ops:flower-pw-123",
        "flower-pw-123",
        "redis-pw-123",
        "operator-key-0123456789abcdef",
    } <= secrets
