"""A task's delivery attempts, as a worker runs them: read → claim → validate → post → record.

Each message of a task keeps its own claim (lease and generation fence), validation, rate-limit
permit, classification and outcome write; only their HTTP exchanges overlap. The thread claims
them all, starts each post as its permit is granted (``ConcurClient.start``: the transport's
engine thread carries them), and records each outcome the moment its answer arrives, so no
message waits behind a slower post of its batch. A first 401 is answered by one token refresh
for the batch and a second post of each message it concerned.

Each message ends with a short verdict for logs and tests (``delivered``, ``retry``,
``dead:<reason>``, ``deferred`` when the global rate limit had no permit in time or no token
could be had, ``paused`` when the circuit breaker (``worker.limits.breaker``) held the posts (both
back
on the schedule, no attempt counted), ``handed_back`` when the worker began
a warm shutdown before the post started, or why nothing was done: ``done``, ``stale``,
``busy``). Every path ends with the outcome written to Redis before the task returns, so the
broker message is acknowledged only after that. An unexpected error leaves a message claimed
under its lease; the schedule hands it out again when the lease ends, so even a bug does not
lose it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import queue
import random
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from worker.concur.client import Reply
from worker.concur.tokens import TokenUnavailable
from worker.limits import breaker, ratelimit
from worker.queue.envelopes import Envelope, Malformed, parse_task
from worker.rules import outcomes
from worker.rules.outcomes import ApiResponse, TransportFailure
from worker.rules.validation import InvalidRequest, validate_wire
from worker.runtime import Runtime
from worker.shapes.models import (
    Message,
    partner_of,
)
from worker.store.codec import AttemptRecord, Claim, Failure, now_ms

log = logging.getLogger("notify.delivery")

HAND_BACK_FLUSH_SECONDS = 5.0
PAUSE_JITTER_MS = 1000  # spreads the messages a breaker paused over a second when it lets go
TOKEN_UNAVAILABLE = "token_unavailable"  # the cause of an attempt deferred for want of a token


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
        "partner": partner_of(request),
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
    """Attempt every message the task carries, their posts in flight together; a summary verdict.

    Once ``stopping()`` says the worker is shutting down, messages not yet claimed are published
    again for another worker, and claimed ones whose post has not started go back on the
    schedule without spending an attempt, instead of holding up the shutdown.
    """
    verdicts: list[str] = []
    envelopes: list[Envelope] = []
    for item in parse_task(args, kwargs):
        if isinstance(item, Malformed):
            verdicts.append(_dead_malformed(item, runtime, task_id))
        else:
            envelopes.append(item)
    if envelopes and stopping():
        # Same generation: whichever copy a worker claims first wins; the other is refused.
        runtime.publish(envelopes)
        # Before the process exits: what the broker does not take meanwhile waits for its
        # grace period on the schedule, or a live worker takes it over (worker.delivery.mover).
        runtime.publisher.flush(HAND_BACK_FLUSH_SECONDS)
        verdicts.extend(["handed_back"] * len(envelopes))
    elif envelopes:
        verdicts.extend(_Batch(runtime, task_id, stopping).run(envelopes))
    if len(verdicts) == 1:
        return verdicts[0]
    counts: dict[str, int] = {}
    for verdict in verdicts:
        counts[verdict] = counts.get(verdict, 0) + 1
    return " ".join(f"{verdict}={count}" for verdict, count in sorted(counts.items()))


def _dead_malformed(envelope: Malformed, rt: Runtime, task_id: str) -> str:
    rt.store.dead_letter(
        envelope.id,
        Failure(
            outcomes.MALFORMED_MESSAGE, envelope.detail, task_id=task_id, worker=rt.worker_name
        ),
        request=json.dumps({"raw": envelope.raw}),
    )
    log.warning("dead letter %s: malformed task (%s)", envelope.id, envelope.detail)
    return f"dead:{outcomes.MALFORMED_MESSAGE}"


def _answered(answers: Answers, attempt: _Attempt, result: ApiResponse | TransportFailure) -> None:
    answers.put((attempt, result))


@dataclass(slots=True)
class _Attempt:
    """One claimed, valid message on its way to the API."""

    envelope: Envelope
    owner: str
    claim: Claim
    message: Message
    started_ms: int = field(default_factory=now_ms)


Answers = queue.SimpleQueue[tuple[_Attempt, ApiResponse | TransportFailure]]


class _Batch:
    """The messages of one task: claimed one by one, posted together, recorded one by one."""

    def __init__(self, runtime: Runtime, task_id: str, stopping: Callable[[], bool]) -> None:
        self.rt = runtime
        self.task_id = task_id
        self.stopping = stopping

    def run(self, envelopes: list[Envelope]) -> list[str]:
        verdicts: list[str] = []
        ready: list[_Attempt] = []
        owned = [(envelope, uuid.uuid4().hex) for envelope in envelopes]
        # Redis commands wait out an outage (NOTIFY_REDIS_PATIENCE_SECONDS,
        # worker.store.redisclient):
        # without that, a task that met a Redis restart would fail, be acknowledged, and leave
        # its messages to the schedule's grace period. A claim tried again is safe: a message
        # it had already claimed is refused as busy and comes back after its lease.
        claims = self.rt.store.claim_many(owned, worker=self.rt.worker_name, task_id=self.task_id)
        for (envelope, owner), claim in zip(owned, claims, strict=True):
            taken = self._check(envelope, owner, claim)
            if isinstance(taken, _Attempt):
                ready.append(taken)
            else:
                verdicts.append(taken)
        if not ready:
            return verdicts
        try:
            token = self.rt.tokens.token()
        except TokenUnavailable as error:
            return verdicts + [self._wait_for_token(attempt, error) for attempt in ready]
        refused = self._post(ready, token, verdicts, token_refreshed=False)
        if refused:
            # One refresh for the batch: every post it concerned goes out once more with it.
            try:
                token = self.rt.tokens.refresh(token)
            except TokenUnavailable as error:
                return verdicts + [self._wait_for_token(attempt, error) for attempt in refused]
            self._post(refused, token, verdicts, token_refreshed=True)
        return verdicts

    def _check(self, envelope: Envelope, owner: str, claim: Claim) -> _Attempt | str:
        """After the claim: an ``_Attempt`` to post, or the message's verdict already."""
        rt = self.rt
        if claim.verdict != "go":
            log.info("message %s: %s (%s), nothing to do", envelope.id, claim.verdict, claim.state)
            return claim.verdict
        if claim.attempt > rt.policy.max_attempts:
            # Only a worker that died mid-attempt, again and again, gets here: stop handing it out.
            return self._dead(
                envelope,
                owner,
                claim,
                Failure(
                    outcomes.RETRIES_EXHAUSTED,
                    f"{claim.attempt - 1} attempts were started and none finished",
                ),
            )
        try:
            message = validate_wire(claim.request, rt.allowlist)
        except InvalidRequest as invalid:
            errors: list[dict[str, str | None]] = [
                {"errorId": None, "errorCode": p.code, "errorMessage": p.message}
                for p in invalid.problems
            ]
            return self._dead(
                envelope, owner, claim, Failure(invalid.reason, str(invalid), errors=errors)
            )
        return _Attempt(envelope, owner, claim, message)

    def _post(
        self, attempts: list[_Attempt], token: str, verdicts: list[str], *, token_refreshed: bool
    ) -> list[_Attempt]:
        """Start each post as its permit comes, record each answer as it arrives.

        Returns the attempts the API answered with a first 401 (their token needs refreshing).
        The circuit breaker is asked first: open, nothing is posted; half-open, one probe is.
        """
        rt = self.rt
        admission = rt.breaker.admit()
        if admission.verdict in (breaker.OPEN, breaker.WAIT):
            # Jitter: when the breaker lets posts through again, not every worker at once.
            due = admission.until_ms if admission.verdict == breaker.OPEN else now_ms()
            verdicts.extend(
                self._paused(a, due + random.randint(0, PAUSE_JITTER_MS)) for a in attempts
            )
            return []
        probing = admission.verdict == breaker.PROBE
        if probing:
            # One post decides; the rest of the batch comes back moments later.
            verdicts.extend(
                self._paused(a, now_ms() + random.randint(PAUSE_JITTER_MS, 2 * PAUSE_JITTER_MS))
                for a in attempts[1:]
            )
            attempts = attempts[:1]
        limiter = rt.rate_limiter
        deadline = limiter.deadline()  # one wait budget for the batch: the lease covers it
        answers: Answers = queue.SimpleQueue()
        together: list[tuple[Message, Reply]] = []
        started = 0
        for attempt in attempts:
            if self.stopping():
                verdicts.append(self._hand_back(attempt))
                continue
            reply = functools.partial(_answered, answers, attempt)
            if not limiter.policy.enabled:
                together.append((attempt.message, reply))  # no pace to keep: all at once
                continue
            permit = limiter.acquire(deadline)
            if not permit.granted:
                verdicts.append(self._deferred(attempt, permit))
                continue
            rt.client.start([(attempt.message, reply)], token)
            started += 1
        if together:
            rt.client.start(together, token)
            started += len(together)
        refused: list[_Attempt] = []
        # The transport answers every post within its deadline; the margin only guards a bug.
        patience = rt.client.timeout_seconds + rt.client.connect_timeout_seconds + 60
        calls = failures = 0  # answers not yet counted by the breaker
        for _ in range(started):
            try:
                attempt, result = answers.get(timeout=patience)
            except queue.Empty:
                raise RuntimeError(
                    "the HTTP transport did not answer within its deadline"
                ) from None
            failed = breaker.counts_as_failure(result)
            if probing:
                rt.breaker.record(1, int(failed), probe=not failed)
            else:
                # Successes are counted once per batch; a failure at once, so the breaker
                # opens while the failing posts are still coming in.
                calls, failures = calls + 1, failures + failed
                if failed:
                    rt.breaker.record(calls, failures)
                    calls = failures = 0
            outcome = outcomes.classify(
                result,
                attempt=attempt.claim.attempt,
                policy=rt.policy,
                token_refreshed=token_refreshed,
            )
            if isinstance(outcome, outcomes.RefreshToken):
                refused.append(attempt)
                continue
            if outcomes.slows_down(outcome):
                limiter.penalize()  # a 429: every worker slows down for a while
            verdicts.append(self._record(attempt, result, outcome))
        if calls:
            rt.breaker.record(calls, failures)
        return refused

    def _record(
        self, attempt: _Attempt, result: ApiResponse | TransportFailure, outcome: outcomes.Outcome
    ) -> str:
        """Write one attempt's outcome (before the task is acknowledged) and log it."""
        rt, envelope, claim = self.rt, attempt.envelope, attempt.claim
        correlation_id = result.correlation_id if isinstance(result, ApiResponse) else None
        status = result.status if isinstance(result, ApiResponse) else None
        started = attempt.started_ms
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
            rt.store.retry(
                envelope.id, attempt.owner, due, _attempt_record(claim, started, result, "retry")
            )
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
        assert isinstance(outcome, outcomes.GiveUp)  # RefreshToken is resolved by the caller
        return self._dead(
            envelope,
            attempt.owner,
            claim,
            Failure(
                outcome.reason,
                outcome.detail,
                status=outcome.status,
                errors=outcome.errors,
                correlation_id=correlation_id,
            ),
            _attempt_record(claim, started, result, "dead"),
            _log_fields(envelope, claim, "dead", result, started),
        )

    def _dead(
        self,
        envelope: Envelope,
        owner: str,
        claim: Claim,
        failure: Failure,
        attempt: AttemptRecord | None = None,
        fields: dict[str, Any] | None = None,
    ) -> str:
        rt = self.rt
        failure = dataclasses.replace(failure, task_id=self.task_id, worker=rt.worker_name)
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

    def _deferred(self, attempt: _Attempt, permit: ratelimit.Permit) -> str:
        # The rate limit is saturated: nothing was posted, so the message waits on the schedule
        # without spending an attempt (never a dead letter for this).
        self.rt.store.defer(
            attempt.envelope.id, attempt.owner, now_ms() + int(permit.retry_in_seconds * 1000)
        )
        log.info(
            "deferred %s: no rate-limit permit within %.1fs, again in %.1fs",
            attempt.envelope.id,
            permit.waited_seconds,
            permit.retry_in_seconds,
        )
        return "deferred"

    def _paused(self, attempt: _Attempt, due_ms: int) -> str:
        # The circuit breaker is not closed: nothing was posted, so no attempt is spent.
        self.rt.store.defer(attempt.envelope.id, attempt.owner, due_ms)
        log.info(
            "paused %s: the circuit breaker holds posts, again in %.1fs",
            attempt.envelope.id,
            max(0, due_ms - now_ms()) / 1000,
        )
        return "paused"

    def _hand_back(self, attempt: _Attempt) -> str:
        # A warm shutdown began before this post started: due now, for whichever worker is up,
        # and no attempt spent.
        self.rt.store.defer(attempt.envelope.id, attempt.owner, now_ms())
        log.info("handed back %s: the worker is shutting down", attempt.envelope.id)
        return "handed_back"

    def _wait_for_token(self, attempt: _Attempt, error: TokenUnavailable) -> str:
        # A credentials outage is not the message's fault: it waits on the schedule without
        # spending an attempt, however long the outage lasts (the provider logged the ERROR).
        claim = attempt.claim
        delay = self.rt.policy.backoff_seconds(max(claim.attempt, 1))
        started = attempt.started_ms
        entry = AttemptRecord(
            claim.attempt, started, "deferred", None, TOKEN_UNAVAILABLE, now_ms() - started, None
        )
        self.rt.store.defer(attempt.envelope.id, attempt.owner, now_ms() + int(delay * 1000), entry)
        log.warning(
            "deferred %s: no Concur token (%s), again in %.1fs", attempt.envelope.id, error, delay
        )
        return "deferred"
