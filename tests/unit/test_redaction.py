"""Logs and Sentry events carry no secret: the redaction, the JSON formatter and the Sentry
scrubber, in this process (with real workers: tests/integration/test_monitoring.py)."""

from __future__ import annotations

import io
import json
import logging
import uuid
from typing import Any

from tests.harness import TEST_TOKEN
from worker.ops.logs import JsonFormatter, RedactingFilter, add_secret, redact, settings_secrets
from worker.ops.monitoring import scrub
from worker.settings import load_settings


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


def test_a_secret_holding_another_is_redacted_whole_and_each_occurrence_goes():
    from worker.ops import logs

    short = f"tok-{uuid.uuid4().hex[:12]}"
    long = f"{short}-and-more-{uuid.uuid4().hex[:8]}"
    logs.add_runtime_secret(short)
    logs.add_runtime_secret(long)
    # Longest first: the long one leaves no tail behind, and every copy of either goes.
    assert redact(f"a {long} b {short} c {short}") == "a [REDACTED] b [REDACTED] c [REDACTED]"


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
