"""The pure decisions, without a network: classification, backoff, Retry-After, envelopes."""

from __future__ import annotations

import random

import pytest

from worker.concur.client import parse_errors, parse_retry_after
from worker.queue.envelopes import Envelope, Malformed, parse_task
from worker.rules import outcomes
from worker.rules.outcomes import (
    ApiResponse,
    Delivered,
    GiveUp,
    RefreshToken,
    Retry,
    TransportFailure,
    classify,
)
from worker.rules.retries import RetryPolicy
from worker.shapes.models import Message, message_id

POLICY = RetryPolicy(
    max_attempts=4, backoff_base_seconds=10, backoff_max_seconds=60, jitter_ratio=0.0
)


@pytest.mark.parametrize("status", [200, 201, 202, 204])
def test_2xx_is_delivered(status: int) -> None:
    assert classify(ApiResponse(status), attempt=1, policy=POLICY) == Delivered(status)


@pytest.mark.parametrize("status", [500, 502, 503, 504, 408, 429])
def test_passing_failures_are_retried_while_attempts_remain(status: int) -> None:
    outcome = classify(ApiResponse(status), attempt=1, policy=POLICY)
    assert isinstance(outcome, Retry)
    assert outcome.delay_seconds == 10
    assert outcome.cause == f"http_{status}"


@pytest.mark.parametrize("kind", ["timeout", "connect", "protocol"])
def test_transport_failures_are_retried(kind: str) -> None:
    outcome = classify(TransportFailure(kind, "x"), attempt=2, policy=POLICY)
    assert outcome == Retry(20.0, kind, None)


def test_last_attempt_failing_is_retries_exhausted_with_status_and_errors() -> None:
    errors = [{"errorId": "1", "errorCode": "DOWN", "errorMessage": "m"}]
    outcome = classify(ApiResponse(503, errors=errors), attempt=4, policy=POLICY)
    assert isinstance(outcome, GiveUp)
    assert (outcome.reason, outcome.status, outcome.errors) == ("retries_exhausted", 503, errors)


@pytest.mark.parametrize("status", [400, 403, 404, 409, 422])
def test_other_4xx_is_dead_lettered_at_once(status: int) -> None:
    outcome = classify(ApiResponse(status), attempt=1, policy=POLICY)
    assert isinstance(outcome, GiveUp)
    assert outcome.reason == outcomes.API_REJECTED


def test_first_401_asks_for_a_fresh_token_and_second_is_dead_lettered() -> None:
    assert classify(ApiResponse(401), attempt=1, policy=POLICY) == RefreshToken()
    outcome = classify(ApiResponse(401), attempt=1, policy=POLICY, token_refreshed=True)
    assert isinstance(outcome, GiveUp)
    assert outcome.reason == outcomes.UNAUTHORIZED


def test_redirect_is_not_followed_but_dead_lettered_for_a_human() -> None:
    outcome = classify(ApiResponse(302), attempt=1, policy=POLICY)
    assert isinstance(outcome, GiveUp)
    assert outcome.reason == outcomes.UNEXPECTED_STATUS


def test_retry_after_wins_when_longer_than_backoff_and_is_capped() -> None:
    policy = RetryPolicy(backoff_base_seconds=1, jitter_ratio=0, retry_after_max_seconds=120)
    assert classify(ApiResponse(429, retry_after_seconds=30), attempt=1, policy=policy) == Retry(
        30.0, "http_429", 429
    )
    longer = classify(ApiResponse(503, retry_after_seconds=9999), attempt=1, policy=policy)
    assert isinstance(longer, Retry) and longer.delay_seconds == 120
    shorter = classify(ApiResponse(503, retry_after_seconds=0), attempt=1, policy=policy)
    assert isinstance(shorter, Retry) and shorter.delay_seconds == 1


def test_backoff_doubles_to_the_cap_and_jitter_never_reaches_zero() -> None:
    policy = RetryPolicy(backoff_base_seconds=60, backoff_max_seconds=300, jitter_ratio=0.2)
    rng = random.Random(7)
    for attempt, nominal in [(1, 60), (2, 120), (3, 240), (4, 300), (7, 300), (100, 300)]:
        for _ in range(50):
            delay = policy.backoff_seconds(attempt, rng)
            assert nominal * 0.8 <= delay <= nominal


def test_default_policy_spreads_eight_attempts_over_about_half_an_hour() -> None:
    policy = RetryPolicy(jitter_ratio=0)
    waits = [policy.backoff_seconds(n) for n in range(1, policy.max_attempts)]
    assert waits == [60, 120, 240, 300, 300, 300, 300]
    assert 20 * 60 <= sum(waits) <= 35 * 60


def test_retry_after_parses_seconds_and_http_dates() -> None:
    assert parse_retry_after("120") == 120.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == 10.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412490.0) == 0.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None


def test_error_body_is_parsed_and_survives_non_json() -> None:
    body = b'{"errors": [{"errorId": "a", "errorCode": "B", "errorMessage": "c", "x": 1}]}'
    assert parse_errors(body) == [{"errorId": "a", "errorCode": "B", "errorMessage": "c"}]
    assert parse_errors(b"<html>Bad gateway</html>") == []
    assert parse_errors(b'{"errors": "nope"}') == []
    assert parse_errors(b"") == []
    assert len(parse_errors(b'{"errors": [' + b",".join([b"{}"] * 50) + b"]}")) == 10


def test_message_id_is_stable_url_safe_and_distinguishes_fields() -> None:
    first = message_id("u", "s", "t")
    assert first == message_id("u", "s", "t")
    assert first.isalnum() and first.islower() and len(first) == 24
    # The separator keeps ("ab", "c") and ("a", "bc") apart.
    assert message_id("ab", "c", "t") != message_id("a", "bc", "t")


def test_message_body_is_exactly_the_seed_shape() -> None:
    message = Message.create("u", "s", "t", "https://a.example/x")
    assert message.body() == {
        "sessionId": "s",
        "templateId": "t",
        "context": {"url": "https://a.example/x"},
    }
    assert Message.create("u", "s", "t").body()["context"] == {}


def test_envelopes_are_read_from_a_well_formed_task() -> None:
    request = {"userId": "u", "sessionId": "s", "templateId": "t", "context": {}}
    assert parse_task(({"id": "abc", "gen": 2, "req": request},), {}) == [
        Envelope("abc", 2, request)
    ]
    # A hand-made task with only the request gets the producer's id.
    assert parse_task(({"req": request},), {}) == [Envelope(message_id("u", "s", "t"), 1, request)]


def test_a_batch_task_yields_one_envelope_or_malformed_per_argument() -> None:
    request = {"userId": "u", "sessionId": "s", "templateId": "t", "context": {}}
    parsed = parse_task(
        ({"id": "a", "gen": 1, "req": request}, "junk", {"id": "b", "gen": 3, "req": request}), {}
    )
    assert parsed[0] == Envelope("a", 1, request)
    assert isinstance(parsed[1], Malformed)
    assert parsed[2] == Envelope("b", 3, request)


@pytest.mark.parametrize(
    ("args", "kwargs"),
    [
        ((), {}),
        (("text",), {}),
        (({"id": "abc", "gen": 1, "req": {}},), {"extra": 1}),
        (({"id": "abc", "gen": "1", "req": {}},), {}),
        (({"id": "abc", "gen": True, "req": {}},), {}),
        (({"id": "../etc", "gen": 1, "req": {}},), {}),
        (({"id": "abc", "gen": 1, "req": []},), {}),
        (({"req": {"userId": 1}},), {}),
    ],
)
def test_malformed_tasks_get_a_stable_id_of_their_own(args: tuple, kwargs: dict) -> None:
    (first,) = parse_task(args, kwargs)
    assert isinstance(first, Malformed)
    assert first.id.startswith("bad")
    assert parse_task(args, kwargs) == [first]


def test_an_oversized_request_is_malformed_before_it_is_stored_anywhere() -> None:
    request = {"userId": "u", "sessionId": "s" * 20_000, "templateId": "t", "context": {}}
    (parsed,) = parse_task(({"id": "abc", "gen": 1, "req": request},), {})
    assert isinstance(parsed, Malformed)
    assert "larger than" in parsed.detail
    assert len(parsed.raw) <= 4096
