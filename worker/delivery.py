"""One delivery attempt, as a worker runs it: read → claim → validate → post → classify → record.

``deliver`` returns a short verdict for logs and tests (``delivered``, ``retry``,
``dead:<reason>``, ``deferred`` when the global rate limit had no permit in time (back on the
schedule, no attempt counted), or why the task did nothing: ``done``, ``stale``, ``busy``).
Every path ends with the outcome written to Redis before the task returns, so the broker
message is acknowledged only after that. An unexpected error leaves the message claimed under
its lease; the schedule hands it out again when the lease ends, so even a bug does not lose it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from worker import outcomes, ratelimit
from worker.concur import ApiResponse, TransportFailure
from worker.models import message_id
from worker.records import AttemptRecord, Claim, Envelope, Failure, now_ms
from worker.runtime import Runtime
from worker.tokens import TokenUnavailable
from worker.validation import InvalidRequest, validate_wire

log = logging.getLogger("notify.delivery")

_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
MAX_RAW_EXCERPT = 4096
# A valid request is a few kilobytes at most (ids of 256 characters, a URL of 2048); anything far
# larger is refused before it is stored anywhere.
MAX_REQUEST_BYTES = 16 * 1024
REDIS_PATIENCE_SECONDS = 60.0
TOKEN_UNAVAILABLE = "token_unavailable"  # the cause of an attempt deferred for want of a token


@dataclass(frozen=True, slots=True)
class Malformed:
    """A task whose arguments cannot be read as an envelope."""

    id: str
    detail: str
    raw: str


def _malformed(raw_value: Any, detail: str) -> Malformed:
    try:
        raw = json.dumps(raw_value, default=repr, ensure_ascii=False)
    except (TypeError, ValueError):
        raw = repr(raw_value)
    raw = raw[:MAX_RAW_EXCERPT]
    # The id comes from the raw content, never from a field the message claims, so a malformed
    # message cannot overwrite another message's record; and it is stable, so a redelivered
    # copy lands on the same dead letter.
    digest = hashlib.blake2b(raw.encode("utf-8", "replace"), digest_size=12).hexdigest()
    return Malformed(f"bad{digest}", detail, raw)


def parse_envelope(value: Any) -> Envelope | Malformed:
    """Read one task argument ``{"id", "gen", "req"}``; anything else is ``Malformed``."""
    if not isinstance(value, dict):
        return _malformed(value, "an envelope must be an object with id, gen and req")
    request = value.get("req")
    if not isinstance(request, dict):
        return _malformed(value, "req is missing or not an object")
    if len(json.dumps(request, default=repr)) > MAX_REQUEST_BYTES:
        return _malformed(value, f"req is larger than {MAX_REQUEST_BYTES} bytes")
    if "id" not in value and "gen" not in value:
        # A hand-made task with only the request: give it the id a producer would have.
        parts = (request.get("userId"), request.get("sessionId"), request.get("templateId"))
        if not all(isinstance(part, str) for part in parts):
            return _malformed(value, "req lacks userId, sessionId or templateId")
        return Envelope(message_id(*parts), 1, request)  # type: ignore[arg-type]
    ident, gen = value.get("id"), value.get("gen")
    if not isinstance(ident, str) or not _ID.match(ident):
        return _malformed(value, "id is not a short URL-safe string")
    if not isinstance(gen, int) or isinstance(gen, bool) or gen < 1:
        return _malformed(value, "gen is not a positive integer")
    return Envelope(ident, gen, request)


def parse_task(args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Envelope | Malformed]:
    """Read a task's arguments: one envelope per positional argument, no keyword arguments."""
    if kwargs or not args:
        return [
            _malformed(
                {"args": args, "kwargs": kwargs},
                "expected one or more envelopes as positional arguments, and nothing else",
            )
        ]
    return [parse_envelope(value) for value in args]


def _attempt_record(
    claim: Claim, started_ms: int, result: ApiResponse | TransportFailure, outcome: str
) -> AttemptRecord:
    if isinstance(result, ApiResponse):
        return AttemptRecord(
            claim.attempt,
            started_ms,
            outcome,
            result.status,
            f"http_{result.status}",
            int(result.elapsed_seconds * 1000),
            result.correlation_id,
        )
    return AttemptRecord(
        claim.attempt,
        started_ms,
        outcome,
        None,
        result.kind,
        int(result.elapsed_seconds * 1000),
        None,
    )


def _log_fields(
    envelope: Envelope,
    claim: Claim,
    outcome: str,
    result: ApiResponse | TransportFailure | None = None,
    started_ms: int | None = None,
) -> dict[str, Any]:
    """The structured fields of an attempt's log line (``extra=``); never the token."""
    request = claim.request if isinstance(claim.request, dict) else {}
    return {
        "message_id": envelope.id,
        "user_id": request.get("userId"),
        "template_id": request.get("templateId"),
        "attempt": claim.attempt,
        "status": result.status if isinstance(result, ApiResponse) else None,
        "duration_ms": None if started_ms is None else now_ms() - started_ms,
        "correlation_id": result.correlation_id if isinstance(result, ApiResponse) else None,
        "outcome": outcome,
    }


def _never() -> bool:
    return False


def deliver_task(
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    runtime: Runtime,
    task_id: str,
    stopping: Callable[[], bool] = _never,
) -> str:
    """Run one attempt for each message the task carries, in turn; a summary verdict.

    Each message is claimed only when its turn comes, so its lease covers its own attempt; a
    message still waiting in a task whose worker dies is handed out again by the schedule.
    Once ``stopping()`` says the worker is shutting down, the messages not yet begun are
    published again for another worker instead of holding up the shutdown.
    """
    verdicts: list[str] = []
    handed_back: list[Envelope] = []
    for item in parse_task(args, kwargs):
        if isinstance(item, Envelope) and stopping():
            handed_back.append(item)
            continue
        verdicts.append(
            _patiently(functools.partial(deliver, item, runtime=runtime, task_id=task_id))
        )
    if handed_back:
        # Same generation: whichever copy a worker claims first wins; the other is refused.
        runtime.publish(handed_back)
        verdicts.extend(["handed_back"] * len(handed_back))
    if len(verdicts) == 1:
        return verdicts[0]
    counts: dict[str, int] = {}
    for verdict in verdicts:
        counts[verdict] = counts.get(verdict, 0) + 1
    return " ".join(f"{verdict}={count}" for verdict, count in sorted(counts.items()))


def _patiently(attempt: Callable[[], str]) -> str:
    """Run ``attempt``, waiting out a Redis outage of up to ``REDIS_PATIENCE_SECONDS``.

    Without this a task that meets a Redis restart fails, is acknowledged, and its messages wait
    for the schedule's grace period. Running an attempt again is safe: a message it had already
    claimed is refused as ``busy`` and comes back after its lease.
    """
    delay = 0.25
    waited = 0.0
    while True:
        try:
            return attempt()
        except (RedisConnectionError, RedisTimeoutError) as error:
            if waited >= REDIS_PATIENCE_SECONDS:
                raise
            log.warning(
                "Redis unavailable (%s); trying again in %.2fs", type(error).__name__, delay
            )
            time.sleep(delay)
            waited += delay
            delay = min(delay * 2, 5.0)


def deliver(envelope: Envelope | Malformed, *, runtime: Runtime, task_id: str) -> str:
    """Run one attempt for one message; see the module docstring."""
    rt = runtime
    if isinstance(envelope, Malformed):
        rt.store.dead_letter(
            envelope.id,
            Failure(
                outcomes.MALFORMED_MESSAGE,
                envelope.detail,
                task_id=task_id,
                worker=rt.worker_name,
            ),
            request=json.dumps({"raw": envelope.raw}),
        )
        log.warning("dead letter %s: malformed task (%s)", envelope.id, envelope.detail)
        return f"dead:{outcomes.MALFORMED_MESSAGE}"

    owner = uuid.uuid4().hex
    claim = rt.store.claim(envelope, owner=owner, worker=rt.worker_name, task_id=task_id)
    if claim.verdict != "go":
        log.info("message %s: %s (%s), nothing to do", envelope.id, claim.verdict, claim.state)
        return claim.verdict

    def dead(
        failure: Failure, attempt: AttemptRecord | None = None, fields: dict[str, Any] | None = None
    ) -> str:
        rt.store.dead_letter(envelope.id, failure, owner=owner, attempt=attempt)
        # Exhausted retries are an operational alert (ERROR reaches Sentry); a request Concur
        # refused, or one we refused, is the partner's to fix (WARNING does not).
        level = logging.ERROR if failure.reason == outcomes.RETRIES_EXHAUSTED else logging.WARNING
        extra = {**(fields or _log_fields(envelope, claim, "dead")), "reason": failure.reason}
        log.log(
            level,
            "dead letter %s: %s (%s)",
            envelope.id,
            failure.reason,
            failure.detail,
            extra=extra,
        )
        return f"dead:{failure.reason}"

    if claim.attempt > rt.policy.max_attempts:
        # Only a worker that died mid-attempt, again and again, gets here: stop handing it out.
        return dead(
            Failure(
                outcomes.RETRIES_EXHAUSTED,
                f"{claim.attempt - 1} attempts were started and none finished",
                task_id=task_id,
                worker=rt.worker_name,
            )
        )
    try:
        message = validate_wire(claim.request, rt.allowlist)
    except InvalidRequest as invalid:
        errors: list[dict[str, str | None]] = [
            {"errorId": None, "errorCode": p.code, "errorMessage": p.message}
            for p in invalid.problems
        ]
        return dead(
            Failure(
                invalid.reason, str(invalid), errors=errors, task_id=task_id, worker=rt.worker_name
            )
        )

    def deferred(permit: ratelimit.Permit) -> str:
        # The rate limit is saturated: nothing was posted, so the message waits on the schedule
        # without spending an attempt (never a dead letter for this).
        rt.store.defer(envelope.id, owner, now_ms() + int(permit.retry_in_seconds * 1000))
        log.info(
            "deferred %s: no rate-limit permit within %.1fs, again in %.1fs",
            envelope.id,
            permit.waited_seconds,
            permit.retry_in_seconds,
        )
        return "deferred"

    def waiting_for_token(error: TokenUnavailable) -> str:
        # A credentials outage is not the message's fault: it waits on the schedule without
        # spending an attempt, however long the outage lasts (the provider logged the ERROR).
        delay = rt.policy.backoff_seconds(max(claim.attempt, 1))
        entry = AttemptRecord(
            claim.attempt, started, "deferred", None, TOKEN_UNAVAILABLE, now_ms() - started, None
        )
        rt.store.defer(envelope.id, owner, now_ms() + int(delay * 1000), entry)
        log.warning("deferred %s: no Concur token (%s), again in %.1fs", envelope.id, error, delay)
        return "deferred"

    limiter = rt.rate_limiter
    permit_deadline = limiter.deadline()
    started = now_ms()
    try:
        token = rt.tokens.token()
    except TokenUnavailable as error:
        return waiting_for_token(error)
    permit = limiter.acquire(permit_deadline)
    if not permit.granted:
        return deferred(permit)
    result = rt.client.post_message(message, token)
    outcome = outcomes.classify(result, attempt=claim.attempt, policy=rt.policy)
    if isinstance(outcome, outcomes.RefreshToken):
        try:
            token = rt.tokens.refresh(token)
        except TokenUnavailable as error:
            return waiting_for_token(error)
        permit = limiter.acquire(permit_deadline)
        if not permit.granted:
            return deferred(permit)
        result = rt.client.post_message(message, token)
        outcome = outcomes.classify(
            result, attempt=claim.attempt, policy=rt.policy, token_refreshed=True
        )
    if ratelimit.slows_down(outcome):
        limiter.penalize()  # a 429: every worker slows down for a while
    correlation_id = result.correlation_id if isinstance(result, ApiResponse) else None
    status = result.status if isinstance(result, ApiResponse) else None

    if isinstance(outcome, outcomes.Delivered):
        rt.store.delivered(envelope.id, _attempt_record(claim, started, result, "delivered"))
        log.info(
            "delivered %s attempt=%d status=%s cid=%s",
            envelope.id,
            claim.attempt,
            status,
            correlation_id,
            extra=_log_fields(envelope, claim, "delivered", result, started),
        )
        return "delivered"
    if isinstance(outcome, outcomes.Retry):
        due = now_ms() + int(outcome.delay_seconds * 1000)
        rt.store.retry(envelope.id, owner, due, _attempt_record(claim, started, result, "retry"))
        log.info(
            "retry %s attempt=%d cause=%s in %.1fs cid=%s",
            envelope.id,
            claim.attempt,
            outcome.cause,
            outcome.delay_seconds,
            correlation_id,
            extra={
                **_log_fields(envelope, claim, "retry", result, started),
                "cause": outcome.cause,
                "delay_seconds": round(outcome.delay_seconds, 3),
            },
        )
        return "retry"
    assert isinstance(outcome, outcomes.DeadLetter)  # RefreshToken was resolved above
    return dead(
        Failure(
            outcome.reason,
            outcome.detail,
            status=outcome.status,
            errors=outcome.errors,
            correlation_id=correlation_id,
            task_id=task_id,
            worker=rt.worker_name,
        ),
        _attempt_record(claim, started, result, "dead"),
        _log_fields(envelope, claim, "dead", result, started),
    )
