"""How an attempt ends, decided without Redis, a network or a clock: the time is passed in."""

from __future__ import annotations

import json
import random

from worker.delivery import ends
from worker.delivery.ends import (
    Attempt,
    DeadLetter,
    Delivered,
    HandedBack,
    NotAttempted,
    NoToken,
    Paused,
    RateLimited,
    RetryLater,
    Unreadable,
)
from worker.queue.envelopes import Malformed, parse_task
from worker.rules import outcomes
from worker.rules.allowlist import AllowList
from worker.rules.outcomes import ApiResponse, TransportFailure
from worker.rules.retries import RetryPolicy
from worker.shapes.models import Message
from worker.store.codec import AttemptRecord, Claim, Failure

POLICY = RetryPolicy(
    max_attempts=3, backoff_base_seconds=10, backoff_max_seconds=60, jitter_ratio=0.0
)
ALLOWLIST = AllowList.from_entries(["welcome"], ["app.example.com"])
STARTED = 1_800_000_000_000  # when the attempt began (ms)
NOW = STARTED + 250  # when its answer was decided
REQUEST = Message.create("user-1", "s-1", "welcome", partner="acme").to_wire()


def _claim(number: int = 1, request: dict | None = None) -> Claim:
    return Claim("go", attempt=number, request=REQUEST if request is None else request)


def _attempt(number: int = 1) -> Attempt:
    taken = ends.after_claim(
        "m-1", "owner-1", _claim(number), policy=POLICY, allowlist=ALLOWLIST, now_ms=STARTED
    )
    assert isinstance(taken, Attempt)
    return taken


def _answered(
    answer: ApiResponse | TransportFailure, number: int = 1
) -> Delivered | RetryLater | DeadLetter:
    attempt = _attempt(number)
    outcome = outcomes.classify(answer, attempt=number, policy=POLICY)
    assert not isinstance(outcome, outcomes.RefreshToken)
    return ends.after_answer(attempt, answer, outcome, now_ms=NOW)


# -- after the claim --


def test_a_valid_claimed_message_becomes_an_attempt_started_now() -> None:
    attempt = _attempt(2)
    assert (attempt.message_id, attempt.owner, attempt.started_ms) == ("m-1", "owner-1", STARTED)
    assert attempt.message == Message.create("user-1", "s-1", "welcome", partner="acme")
    assert attempt.claim.attempt == 2


def test_a_claim_refused_as_busy_is_not_attempted_and_keeps_the_state_for_the_log() -> None:
    claim = Claim("busy", state="inflight")
    taken = ends.after_claim(
        "m-1", "owner-1", claim, policy=POLICY, allowlist=ALLOWLIST, now_ms=STARTED
    )
    assert taken == NotAttempted("m-1", "busy", "inflight")


def test_a_message_claimed_past_its_last_attempt_is_a_dead_letter_without_a_post() -> None:
    # Its worker died mid-attempt three times: the fourth claim stops handing it out.
    taken = ends.after_claim(
        "m-1", "owner-1", _claim(4), policy=POLICY, allowlist=ALLOWLIST, now_ms=STARTED
    )
    assert isinstance(taken, DeadLetter)
    assert taken.failure.reason == outcomes.RETRIES_EXHAUSTED
    assert taken.failure.detail == "3 attempts were started and none finished"
    assert taken.entry is None and taken.owner == "owner-1"


def test_a_stored_request_the_allow_list_refuses_is_a_dead_letter_with_its_problems() -> None:
    request = {**REQUEST, "templateId": "not-listed"}
    taken = ends.after_claim(
        "m-1", "owner-1", _claim(1, request), policy=POLICY, allowlist=ALLOWLIST, now_ms=STARTED
    )
    assert isinstance(taken, DeadLetter)
    assert taken.failure.reason == outcomes.TEMPLATE_NOT_ALLOWED
    assert taken.failure.errors and taken.failure.errors[0]["errorId"] is None
    assert taken.entry is None


# -- after the answer --


def test_a_2xx_is_delivered_with_the_attempts_entry() -> None:
    end = _answered(ApiResponse(201, correlation_id="cid-1", elapsed_seconds=0.084))
    assert end == Delivered(
        "m-1", _claim(), AttemptRecord(1, STARTED, "delivered", 201, "http_201", 84, "cid-1")
    )


def test_503_with_attempts_left_is_retried_after_the_backoff_from_now() -> None:
    end = _answered(ApiResponse(503, correlation_id="cid-2"), number=2)
    assert isinstance(end, RetryLater)
    assert (end.owner, end.cause, end.delay_seconds) == ("owner-1", "http_503", 20.0)
    assert end.due_ms == NOW + 20_000
    assert end.entry == AttemptRecord(2, STARTED, "retry", 503, "http_503", 0, "cid-2")


def test_a_retry_after_longer_than_the_backoff_sets_the_due_time() -> None:
    end = _answered(ApiResponse(429, retry_after_seconds=45.0))
    assert isinstance(end, RetryLater)
    assert end.due_ms == NOW + 45_000


def test_a_timeout_is_retried_and_recorded_with_its_kind_and_no_status() -> None:
    end = _answered(TransportFailure("timeout", "no answer in 1 s", elapsed_seconds=1.0))
    assert isinstance(end, RetryLater)
    assert end.entry == AttemptRecord(1, STARTED, "retry", None, "timeout", 1000, None)


def test_503_on_the_last_attempt_is_a_dead_letter_retries_exhausted() -> None:
    errors: list[dict[str, str | None]] = [{"errorId": "E1", "errorCode": "X", "errorMessage": "m"}]
    end = _answered(ApiResponse(503, correlation_id="cid-3", errors=errors), number=3)
    assert isinstance(end, DeadLetter)
    assert end.failure == Failure(
        outcomes.RETRIES_EXHAUSTED,
        "http_503 on attempt 3 of 3",
        status=503,
        errors=errors,
        correlation_id="cid-3",
    )
    assert end.entry == AttemptRecord(3, STARTED, "dead", 503, "http_503", 0, "cid-3")


def test_a_refused_request_is_a_dead_letter_api_rejected_at_once() -> None:
    end = _answered(ApiResponse(400, correlation_id="cid-4"))
    assert isinstance(end, DeadLetter)
    assert (end.failure.reason, end.failure.status) == (outcomes.API_REJECTED, 400)
    assert end.failure.correlation_id == "cid-4"


def test_a_connection_failure_on_the_last_attempt_is_a_dead_letter_without_a_status() -> None:
    end = _answered(TransportFailure("connect", "refused"), number=3)
    assert isinstance(end, DeadLetter)
    assert end.failure.reason == outcomes.RETRIES_EXHAUSTED
    assert end.failure.status is None and end.failure.correlation_id is None


# -- never posted: back on the schedule, no attempt spent --


def test_token_unavailable_defers_without_spending_an_attempt() -> None:
    end = ends.no_token(_attempt(2), "token endpoint down", policy=POLICY, now_ms=NOW)
    # A deferral (the store's defer), not a retry: the attempt number is not used up.
    assert end == NoToken(
        "m-1",
        "owner-1",
        AttemptRecord(2, STARTED, "deferred", None, ends.TOKEN_UNAVAILABLE, 250, None),
        NOW + 20_000,
        20.0,
        "token endpoint down",
    )


def test_token_unavailable_before_any_attempt_waits_the_first_backoff() -> None:
    end = ends.no_token(_attempt(0), "down", policy=POLICY, now_ms=NOW)
    assert end.delay_seconds == 10.0 and end.due_ms == NOW + 10_000


def test_no_rate_limit_permit_in_time_defers_by_the_permits_answer() -> None:
    end = ends.rate_limited(_attempt(), waited_seconds=5.0, retry_in_seconds=1.5, now_ms=NOW)
    assert end == RateLimited("m-1", "owner-1", NOW + 1500, 5.0, 1.5)


def test_an_open_breaker_pauses_until_it_may_let_go_plus_at_most_a_second_of_jitter() -> None:
    rng = random.Random(7)
    until = NOW + 30_000
    dues = [ends.paused(_attempt(), until, rng=rng).due_ms for _ in range(200)]
    assert all(until <= due <= until + ends.PAUSE_JITTER_MS for due in dues)
    assert len(set(dues)) > 100, "the paused messages should not all come back at once"


def test_behind_a_half_open_breakers_probe_the_rest_come_back_in_one_to_two_seconds() -> None:
    rng = random.Random(7)
    end = ends.behind_probe(_attempt(), now_ms=NOW, rng=rng)
    assert isinstance(end, Paused) and end.owner == "owner-1"
    assert NOW + ends.PAUSE_JITTER_MS <= end.due_ms <= NOW + 2 * ends.PAUSE_JITTER_MS


def test_a_warm_shutdown_hands_the_message_back_due_now() -> None:
    assert ends.handed_back(_attempt(), now_ms=NOW) == HandedBack("m-1", "owner-1", NOW)


# -- not a message at all --


def test_a_malformed_task_is_dead_lettered_keeping_the_raw_excerpt_as_its_request() -> None:
    [malformed] = parse_task(({"id": "abc", "gen": "1", "req": {}},), {})
    assert isinstance(malformed, Malformed)
    end = ends.unreadable(malformed)
    assert end == Unreadable(
        malformed.id,
        Failure(outcomes.MALFORMED_MESSAGE, malformed.detail),
        json.dumps({"raw": malformed.raw}),
    )
