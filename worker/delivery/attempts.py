"""A task's delivery attempts, as a worker runs them: read → claim → validate → post → record.

Each message of a task keeps its own claim (lease and generation fence), validation, rate-limit
permit, classification and outcome write; only their HTTP exchanges overlap. The thread claims
them all, starts each post as its permit is granted (``ConcurClient.start``: the transport's
engine thread carries them), and records each outcome the moment its answer arrives, so no
message waits behind a slower post of its batch. A first 401 is answered by one token refresh
for the batch and a second post of each message it concerned.

How each message's attempt ends is a value decided by the pure functions of
``worker.delivery.ends`` (delivered, retry, dead letter, deferred for want of a token or of a
rate-limit permit, paused by the circuit breaker, handed back at a warm shutdown, or not
attempted at all); ``_Batch.record`` is the one place that writes it to Redis and logs it, and
returns its short verdict for logs and tests (``delivered``, ``retry``, ``dead:<reason>``,
``deferred``, ``paused``, ``handed_back``, or why nothing was done: ``done``, ``stale``,
``busy``). Every path ends with the outcome written to Redis before the task returns, so the
broker message is acknowledged only after that. An unexpected error leaves a message claimed
under its lease; the schedule hands it out again when the lease ends, so even a bug does not
lose it.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import queue
import uuid
from collections.abc import Callable
from typing import Any

from worker.concur.client import Reply
from worker.concur.tokens import TokenUnavailable
from worker.delivery import ends
from worker.delivery.ends import (
    Attempt,
    DeadLetter,
    Delivered,
    End,
    HandedBack,
    NotAttempted,
    NoToken,
    Paused,
    RateLimited,
    RetryLater,
    Unreadable,
)
from worker.delivery.parts import DeliveryParts
from worker.limits import breaker
from worker.limits.breaker import Breaker, counts_as_failure
from worker.queue.envelopes import Envelope, Malformed, parse_task
from worker.rules import outcomes
from worker.rules.outcomes import ApiResponse, TransportFailure
from worker.shapes.models import Message, partner_of
from worker.store.codec import AttemptRecord, Claim, Failure, now_ms

log = logging.getLogger("notify.delivery")

HAND_BACK_FLUSH_SECONDS = 5.0


def _log_fields(
    message_id: str, claim: Claim, outcome: str, entry: AttemptRecord | None
) -> dict[str, Any]:
    """The structured fields of an attempt's log line (``extra=``); never the token."""
    request = claim.request if isinstance(claim.request, dict) else {}
    return {
        "message_id": message_id,
        "user_id": request.get("userId"),
        "template_id": request.get("templateId"),
        "partner": partner_of(request),
        "attempt": claim.attempt,
        "status": None if entry is None else entry.status,
        "duration_ms": None if entry is None else now_ms() - entry.at_ms,
        "correlation_id": None if entry is None else entry.correlation_id,
        "outcome": outcome,
    }


def _never() -> bool:
    return False


def deliver_task(
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    *,
    parts: DeliveryParts,
    task_id: str,
    stopping: Callable[[], bool] = _never,
) -> str:
    """Attempt every message the task carries, their posts in flight together; a summary verdict.

    Once ``stopping()`` says the worker is shutting down, messages not yet claimed are published
    again for another worker, and claimed ones whose post has not started go back on the
    schedule without spending an attempt, instead of holding up the shutdown.
    """
    batch = _Batch(parts, task_id, stopping)
    verdicts: list[str] = []
    envelopes: list[Envelope] = []
    for item in parse_task(args, kwargs):
        if isinstance(item, Malformed):
            verdicts.append(batch.record(ends.unreadable(item)))
        else:
            envelopes.append(item)
    if envelopes and stopping():
        # Same generation: whichever copy a worker claims first wins; the other is refused.
        parts.publisher.submit(envelopes)
        # Before the process exits: what the broker does not take meanwhile waits for its
        # grace period on the schedule, or a live worker takes it over (worker.delivery.mover).
        parts.publisher.flush(HAND_BACK_FLUSH_SECONDS)
        verdicts.extend(["handed_back"] * len(envelopes))
    elif envelopes:
        verdicts.extend(batch.run(envelopes))
    if len(verdicts) == 1:
        return verdicts[0]
    counts: dict[str, int] = {}
    for verdict in verdicts:
        counts[verdict] = counts.get(verdict, 0) + 1
    return " ".join(f"{verdict}={count}" for verdict, count in sorted(counts.items()))


Answers = queue.SimpleQueue[tuple[Attempt, ApiResponse | TransportFailure]]


def _answered(answers: Answers, attempt: Attempt, result: ApiResponse | TransportFailure) -> None:
    answers.put((attempt, result))


class _Tally:
    """A batch's answers as the circuit breaker counts them."""

    def __init__(self, circuit: Breaker, *, probing: bool) -> None:
        self.circuit = circuit
        self.probing = probing
        self.calls = self.failures = 0  # answers not yet counted by the breaker

    def count(self, result: ApiResponse | TransportFailure) -> None:
        """Count one answer (a half-open breaker's probe decides at once)."""
        failed = counts_as_failure(result)
        if self.probing:
            self.circuit.record(1, int(failed), probe=not failed)
            return
        # Successes are counted once per batch; a failure at once, so the breaker opens while
        # the failing posts are still coming in.
        self.calls, self.failures = self.calls + 1, self.failures + failed
        if failed:
            self.flush()

    def flush(self) -> None:
        """Hand the answers counted so far to the breaker."""
        if self.calls:
            self.circuit.record(self.calls, self.failures)
            self.calls = self.failures = 0


class _Batch:
    """The messages of one task: claimed one by one, posted together, recorded one by one."""

    def __init__(self, parts: DeliveryParts, task_id: str, stopping: Callable[[], bool]) -> None:
        self.parts = parts
        self.task_id = task_id
        self.stopping = stopping

    def run(self, envelopes: list[Envelope]) -> list[str]:
        """Claim, post and record every message of the task; their verdicts."""
        parts = self.parts
        verdicts: list[str] = []
        ready: list[Attempt] = []
        owned = [(envelope, uuid.uuid4().hex) for envelope in envelopes]
        # Redis commands wait out an outage (NOTIFY_REDIS_PATIENCE_SECONDS,
        # worker.store.redisclient):
        # without that, a task that met a Redis restart would fail, be acknowledged, and leave
        # its messages to the schedule's grace period. A claim tried again is safe: a message
        # it had already claimed is refused as busy and comes back after its lease.
        claims = parts.store.claim_many(owned, worker=parts.worker_name, task_id=self.task_id)
        for (envelope, owner), claim in zip(owned, claims, strict=True):
            taken = ends.after_claim(
                envelope.id,
                owner,
                claim,
                policy=parts.policy,
                allowlist=parts.allowlist,
                now_ms=now_ms(),
            )
            if isinstance(taken, Attempt):
                ready.append(taken)
            else:
                verdicts.append(self.record(taken))
        if not ready:
            return verdicts
        try:
            token = parts.tokens.token()
        except TokenUnavailable as error:
            return verdicts + self._without_token(ready, error)
        refused = self._post(ready, token, verdicts, token_refreshed=False)
        if refused:
            # One refresh for the batch: every post it concerned goes out once more with it.
            try:
                token = parts.tokens.refresh(token)
            except TokenUnavailable as error:
                return verdicts + self._without_token(refused, error)
            self._post(refused, token, verdicts, token_refreshed=True)
        return verdicts

    def _without_token(self, attempts: list[Attempt], error: TokenUnavailable) -> list[str]:
        # The provider logged the ERROR; each message waits without spending an attempt.
        policy = self.parts.policy
        return [
            self.record(ends.no_token(attempt, str(error), policy=policy, now_ms=now_ms()))
            for attempt in attempts
        ]

    def _post(
        self, attempts: list[Attempt], token: str, verdicts: list[str], *, token_refreshed: bool
    ) -> list[Attempt]:
        """Start each post as its permit comes, record each answer as it arrives.

        Returns the attempts the API answered with a first 401 (their token needs refreshing).
        The circuit breaker is asked first: open, nothing is posted; half-open, one probe is.
        """
        parts = self.parts
        admission = parts.breaker.admit()
        if admission.verdict in (breaker.OPEN, breaker.WAIT):
            due = admission.until_ms if admission.verdict == breaker.OPEN else now_ms()
            verdicts.extend(self.record(ends.paused(attempt, due)) for attempt in attempts)
            return []
        probing = admission.verdict == breaker.PROBE
        if probing:
            # One post decides; the rest of the batch comes back moments later.
            verdicts.extend(
                self.record(ends.behind_probe(attempt, now_ms=now_ms())) for attempt in attempts[1:]
            )
            attempts = attempts[:1]
        answers, started = self._start(attempts, token, verdicts)
        tally = _Tally(parts.breaker, probing=probing)
        refused: list[Attempt] = []
        # The transport answers every post within its deadline; the margin only guards a bug.
        patience = parts.client.timeout_seconds + parts.client.connect_timeout_seconds + 60
        for _ in range(started):
            try:
                attempt, result = answers.get(timeout=patience)
            except queue.Empty:
                raise RuntimeError(
                    "the HTTP transport did not answer within its deadline"
                ) from None
            tally.count(result)
            outcome = outcomes.classify(
                result,
                attempt=attempt.claim.attempt,
                policy=parts.policy,
                token_refreshed=token_refreshed,
            )
            if isinstance(outcome, outcomes.RefreshToken):
                refused.append(attempt)
                continue
            if outcomes.slows_down(outcome):
                parts.rate_limiter.penalize()  # a 429: every worker slows down for a while
            verdicts.append(
                self.record(ends.after_answer(attempt, result, outcome, now_ms=now_ms()))
            )
        tally.flush()
        return refused

    def _start(
        self, attempts: list[Attempt], token: str, verdicts: list[str]
    ) -> tuple[Answers, int]:
        """Start the posts (each after its rate-limit permit); their answers, and how many."""
        parts = self.parts
        limiter = parts.rate_limiter
        deadline = limiter.deadline()  # one wait budget for the batch: the lease covers it
        answers: Answers = queue.SimpleQueue()
        together: list[tuple[Message, Reply]] = []
        started = 0
        for attempt in attempts:
            if self.stopping():
                verdicts.append(self.record(ends.handed_back(attempt, now_ms=now_ms())))
                continue
            reply = functools.partial(_answered, answers, attempt)
            if not limiter.policy.enabled:
                together.append((attempt.message, reply))  # no pace to keep: all at once
                continue
            permit = limiter.acquire(deadline)
            if not permit.granted:
                verdicts.append(
                    self.record(
                        ends.rate_limited(
                            attempt,
                            waited_seconds=permit.waited_seconds,
                            retry_in_seconds=permit.retry_in_seconds,
                            now_ms=now_ms(),
                        )
                    )
                )
                continue
            parts.client.start([(attempt.message, reply)], token)
            started += 1
        if together:
            parts.client.start(together, token)
            started += len(together)
        return answers, started

    def record(self, end: End) -> str:
        """Write how a message's attempt ended (before the task is acknowledged) and log it.

        The one place an end reaches the store and the log; returns the message's verdict.
        """
        store = self.parts.store
        match end:
            case Delivered():
                store.delivered(end.message_id, end.entry)
                log.info(
                    "delivered %s attempt=%d status=%s cid=%s",
                    end.message_id,
                    end.claim.attempt,
                    end.entry.status,
                    end.entry.correlation_id,
                    extra=_log_fields(end.message_id, end.claim, "delivered", end.entry),
                )
                return "delivered"
            case RetryLater():
                store.retry(end.message_id, end.owner, end.due_ms, end.entry)
                log.info(
                    "retry %s attempt=%d cause=%s in %.1fs cid=%s",
                    end.message_id,
                    end.claim.attempt,
                    end.cause,
                    end.delay_seconds,
                    end.entry.correlation_id,
                    extra={
                        **_log_fields(end.message_id, end.claim, "retry", end.entry),
                        "cause": end.cause,
                        "delay_seconds": round(end.delay_seconds, 3),
                    },
                )
                return "retry"
            case DeadLetter():
                failure = self._signed(end.failure)
                store.dead_letter(end.message_id, failure, owner=end.owner, attempt=end.entry)
                # Exhausted retries are an operational alert (ERROR reaches Sentry); a request
                # Concur refused, or one we refused, is the partner's to fix (WARNING does not).
                exhausted = failure.reason == outcomes.RETRIES_EXHAUSTED
                log.log(
                    logging.ERROR if exhausted else logging.WARNING,
                    "dead letter %s: %s (%s)",
                    end.message_id,
                    failure.reason,
                    failure.detail,
                    extra={
                        **_log_fields(end.message_id, end.claim, "dead", end.entry),
                        "reason": failure.reason,
                    },
                )
                return f"dead:{failure.reason}"
            case Unreadable():
                failure = self._signed(end.failure)
                store.dead_letter(end.message_id, failure, request=end.request)
                log.warning("dead letter %s: malformed task (%s)", end.message_id, failure.detail)
                return f"dead:{failure.reason}"
            case NotAttempted():
                log.info(
                    "message %s: %s (%s), nothing to do", end.message_id, end.verdict, end.state
                )
                return end.verdict
            case NoToken():
                store.defer(end.message_id, end.owner, end.due_ms, end.entry)
                log.warning(
                    "deferred %s: no Concur token (%s), again in %.1fs",
                    end.message_id,
                    end.error,
                    end.delay_seconds,
                )
                return "deferred"
            case RateLimited():
                store.defer(end.message_id, end.owner, end.due_ms)
                log.info(
                    "deferred %s: no rate-limit permit within %.1fs, again in %.1fs",
                    end.message_id,
                    end.waited_seconds,
                    end.retry_in_seconds,
                )
                return "deferred"
            case Paused():
                store.defer(end.message_id, end.owner, end.due_ms)
                log.info(
                    "paused %s: the circuit breaker holds posts, again in %.1fs",
                    end.message_id,
                    max(0, end.due_ms - now_ms()) / 1000,
                )
                return "paused"
            case HandedBack():
                store.defer(end.message_id, end.owner, end.due_ms)
                log.info("handed back %s: the worker is shutting down", end.message_id)
                return "handed_back"

    def _signed(self, failure: Failure) -> Failure:
        # A dead letter says which task and worker gave up on it.
        return dataclasses.replace(failure, task_id=self.task_id, worker=self.parts.worker_name)
