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
``deferred``, ``paused``, ``handed_back``, ``waiting``, or why nothing was done: ``done``,
``stale``, ``busy``). Every path ends with the outcome written to Redis before the task
returns, so the broker message is acknowledged only after that. An unexpected error leaves a
message claimed under its lease; the schedule hands it out again when the lease ends, so even a
bug does not lose it.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import queue
import time
import uuid
from collections.abc import Callable
from typing import Any

from worker.concur.client import Reply
from worker.concur.tokens import CompanyNeedsReconnect, TokenProvider, TokenUnavailable
from worker.delivery import ends
from worker.delivery.ends import (
    Attempt,
    CompanyWaiting,
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
from worker.limits.breaker import Admission, Breaker, counts_as_failure
from worker.limits.ratelimit import Permit, RateLimiter
from worker.ops.tracing import BatchTrace, batch_trace
from worker.queue.envelopes import Envelope, Malformed, parse_task
from worker.rules import outcomes
from worker.rules.outcomes import ApiResponse, TransportFailure
from worker.shapes.models import DEFAULT_COMPANY, CompanyState, Message, company_of, partner_of
from worker.shapes.times import iso_utc
from worker.store.codec import AttemptRecord, Claim, Failure, now_ms

log = logging.getLogger("notify.delivery")

HAND_BACK_FLUSH_SECONDS = 5.0


def _log_fields(
    message_id: str, claim: Claim, outcome: str, entry: AttemptRecord | None
) -> dict[str, Any]:
    """The structured fields of an attempt's log line (``extra=``); never the token."""
    request = claim.request if isinstance(claim.request, dict) else {}
    fields: dict[str, Any] = {
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
    company = company_of(request)
    if company != DEFAULT_COMPANY:
        # Only a registry company's lines carry it: Sentry keeps the first ten extras of an
        # event, and a dead letter's ``reason`` (a tag) comes first (see ``record``).
        fields["company"] = company
    return fields


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

    The batch first takes a slot of the process's cap on posts in flight for each message
    (``NOTIFY_MAX_IN_FLIGHT``, worker.limits.inflight), before its claims so that a wait for
    slots does not eat into their leases; each slot goes back when its message's outcome is
    written.
    """
    batch = _Batch(parts, task_id, stopping)
    verdicts: list[str] = []
    envelopes: list[Envelope] = []
    for item in parse_task(args, kwargs):
        if isinstance(item, Malformed):
            verdicts.append(batch.record(ends.unreadable(item)))
        else:
            envelopes.append(item)
    taken = (
        bool(envelopes)
        and not stopping()
        and parts.in_flight.take(len(envelopes), stopping=stopping)
    )
    if envelopes and not taken:
        # Same generation: whichever copy a worker claims first wins; the other is refused.
        parts.publisher.submit(envelopes)
        # Before the process exits: what the broker does not take meanwhile waits for its
        # grace period on the schedule, or a live worker takes it over (worker.delivery.mover).
        parts.publisher.flush(HAND_BACK_FLUSH_SECONDS)
        verdicts.extend(["handed_back"] * len(envelopes))
    elif envelopes:
        batch.slots = len(envelopes)
        try:
            verdicts.extend(batch.run(envelopes))
        finally:
            batch.keep(0)  # whatever an error left taken
            batch.close_trace()
    if len(verdicts) == 1:
        return verdicts[0]
    counts: dict[str, int] = {}
    for verdict in verdicts:
        counts[verdict] = counts.get(verdict, 0) + 1
    return " ".join(f"{verdict}={count}" for verdict, count in sorted(counts.items()))


class _Route:
    """The posts of one company in a batch: its token, where they go, what paces and guards them."""

    __slots__ = ("attempts", "base_url", "breaker", "company", "limiter", "token", "tokens")

    def __init__(
        self,
        company: str,
        tokens: TokenProvider,
        token: str,
        base_url: str | None,
        circuit: Breaker,
        limiter: RateLimiter | None,
        attempts: list[Attempt],
    ) -> None:
        self.company = company
        self.tokens = tokens
        self.token = token
        self.base_url = base_url  # None: the default company's (the client's own base)
        self.breaker = circuit
        self.limiter = limiter  # the company's own pace, when it has one
        self.attempts = attempts


Answers = queue.SimpleQueue[tuple[_Route, Attempt, ApiResponse | TransportFailure]]


def _answered(
    answers: Answers, route: _Route, attempt: Attempt, result: ApiResponse | TransportFailure
) -> None:
    answers.put((route, attempt, result))


def by_company(attempts: list[Attempt]) -> dict[str, list[Attempt]]:
    """A batch's attempts grouped by their message's company, in the batch's order (pure)."""
    groups: dict[str, list[Attempt]] = {}
    for attempt in attempts:
        groups.setdefault(company_of(attempt.claim.request), []).append(attempt)
    return groups


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
        self.slots = 0  # slots of the cap on posts in flight this batch holds
        self.trace: BatchTrace | None = None  # each message's spans, when tracing is on

    def keep(self, count: int) -> None:
        """Give back the batch's slots beyond ``count`` (messages that will not be posted, or
        whose outcome is written)."""
        extra = self.slots - max(0, count)
        if extra > 0:
            self.slots -= extra
            self.parts.in_flight.give(extra)

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
        self.trace = batch_trace([(envelope.id, envelope.trace) for envelope in envelopes])
        claiming = time.time_ns()
        claims = parts.store.claim_many(owned, worker=parts.worker_name, task_id=self.task_id)
        if self.trace is not None:
            self.trace.claimed(
                claiming,
                time.time_ns(),
                [(e.id, c.verdict, c.attempt) for (e, _), c in zip(owned, claims, strict=True)],
            )
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
        self.keep(len(ready))
        if not ready:
            return verdicts
        routes = self._routes(by_company(ready), verdicts)
        refused = self._post(routes, verdicts, token_refreshed=False)
        again: list[_Route] = []
        for route in refused:
            # One refresh per company of the batch: every post it concerned goes out once more.
            asking = time.time_ns()
            try:
                route.token = route.tokens.refresh(route.token)
            except CompanyNeedsReconnect:
                self._traced_token(route.company, route.attempts, asking, "needs_reconnect", True)
                verdicts.extend(self._waiting(route.company, route.attempts))
                continue
            except TokenUnavailable as error:
                self._traced_token(route.company, route.attempts, asking, str(error), True)
                verdicts.extend(self._without_token(route.company, route.attempts, error))
                continue
            self._traced_token(route.company, route.attempts, asking, None, True)
            again.append(route)
        if again:
            self._post(again, verdicts, token_refreshed=True)
        return verdicts

    def _routes(self, groups: dict[str, list[Attempt]], verdicts: list[str]) -> list[_Route]:
        """Each company's attempts with its token, geolocation and limits (one token call per
        company). Only the default company's: no Redis round trip beyond today's."""
        parts = self.parts
        routes: list[_Route] = []
        default = groups.pop(DEFAULT_COMPANY, None)
        if default:
            asking = time.time_ns()
            try:
                token = parts.tokens.token()
            except TokenUnavailable as error:
                self._traced_token(DEFAULT_COMPANY, default, asking, str(error))
                verdicts.extend(self._without_token(DEFAULT_COMPANY, default, error))
            else:
                self._traced_token(DEFAULT_COMPANY, default, asking)
                routes.append(
                    _Route(DEFAULT_COMPANY, parts.tokens, token, None, parts.breaker, None, default)
                )
        if not groups:
            return routes
        # Every registry company of the batch read in one pipelined round trip.
        known = parts.companies.get_many(list(groups))
        going: dict[str, list[Attempt]] = {}
        for company, attempts in groups.items():
            found = known.get(company)
            gated = self._gated(
                company,
                attempts,
                None if found is None else found.state,
                None if found is None else found.state_ms,
                verdicts,
            )
            if gated:
                going[company] = gated
        if not going:
            return routes
        # The batch's companies get their tokens together: the fleet's shared ones in one
        # round trip, the rest fetched side by side (not one company after another).
        asking = time.time_ns()
        tokens = parts.company_tokens.tokens(list(going))
        # Imported here: a deployment of the default company alone never loads OAuth (nor the
        # sealing it brings, several MB a process).
        from worker.concur.oauth import api_base_for

        for company, attempts in going.items():
            got = tokens[company]
            if isinstance(got, CompanyNeedsReconnect):
                self._traced_token(company, attempts, asking, "needs_reconnect")
                verdicts.extend(self._waiting(company, attempts))
                continue
            if isinstance(got, TokenUnavailable):
                self._traced_token(company, attempts, asking, str(got))
                verdicts.extend(self._without_token(company, attempts, got))
                continue
            self._traced_token(company, attempts, asking)
            provider = parts.company_tokens.provider(company)
            found = known.get(company)
            # The geolocation its token came from (followed under the trust rules), else the
            # one the registry holds (written under the same rules).
            where = provider.geolocation or (None if found is None else found.geolocation)
            base_url = None if where is None else api_base_for(where, parts.client.base_url)
            routes.append(
                _Route(
                    company,
                    provider,
                    got,
                    base_url,
                    parts.breakers.for_geolocation(where),
                    parts.company_rate_limiter(company),
                    attempts,
                )
            )
        return routes

    def _gated(
        self,
        company: str,
        attempts: list[Attempt],
        state: CompanyState | None,
        state_ms: int | None,
        verdicts: list[str],
    ) -> list[Attempt]:
        """A registry company's attempts that may go out by its state; the others' ends are
        recorded (a company not connected: waiting, or dead letters)."""
        parts = self.parts
        at = now_ms()
        going: list[Attempt] = []
        for attempt in attempts:
            gated = ends.for_company(
                attempt, company, state, state_ms, policy=parts.company_policy, now_ms=at
            )
            if isinstance(gated, Attempt):
                going.append(gated)
            else:
                verdicts.append(self.record(gated))
        return going

    def _traced_token(
        self,
        company: str,
        attempts: list[Attempt],
        start_ns: int,
        error: str | None = None,
        refresh: bool = False,
    ) -> None:
        if self.trace is not None:
            ids = [attempt.message_id for attempt in attempts]
            self.trace.token(ids, company, start_ns, refresh=refresh, error=error)

    def close_trace(self) -> None:
        """End the spans of messages the task left without an outcome (an unexpected error)."""
        if self.trace is not None:
            self.trace.close()

    def _waiting(self, company: str, attempts: list[Attempt]) -> list[str]:
        """Concur just refused the company's refresh token: its messages wait from now on, as
        those of a company found waiting to be reconnected."""
        parts = self.parts
        at = now_ms()
        verdicts = []
        for attempt in attempts:
            waits = ends.for_company(
                attempt, company, "needs_reconnect", at, policy=parts.company_policy, now_ms=at
            )
            assert not isinstance(waits, Attempt)
            verdicts.append(self.record(waits))
        return verdicts

    def _without_token(
        self, company: str, attempts: list[Attempt], error: TokenUnavailable
    ) -> list[str]:
        # The provider logged the ERROR; each message waits without spending an attempt.
        policy = self.parts.policy
        return [
            self.record(ends.no_token(attempt, str(error), policy=policy, now_ms=now_ms()))
            for attempt in attempts
        ]

    def _post(
        self, routes: list[_Route], verdicts: list[str], *, token_refreshed: bool
    ) -> list[_Route]:
        """Start each post as its permit comes, record each answer as it arrives.

        Returns the routes whose posts the API answered with a first 401, holding only those
        attempts (their token needs refreshing). Each geolocation's circuit breaker is asked
        once: open, nothing is posted there; half-open, one probe is.
        """
        parts = self.parts
        admissions: dict[str, Admission] = {}
        tallies: dict[str, _Tally] = {}
        posting: list[_Route] = []
        for route in routes:
            circuit = route.breaker
            admission = admissions.get(circuit.name)
            if admission is None:
                admission = admissions[circuit.name] = circuit.admit()
            if admission.verdict in (breaker.OPEN, breaker.WAIT):
                due = admission.until_ms if admission.verdict == breaker.OPEN else now_ms()
                verdicts.extend(self.record(ends.paused(a, due)) for a in route.attempts)
                continue
            if admission.verdict == breaker.PROBE:
                if circuit.name in tallies:
                    # That geolocation's one probe is another company's post of this batch.
                    verdicts.extend(
                        self.record(ends.behind_probe(a, now_ms=now_ms())) for a in route.attempts
                    )
                    continue
                # One post decides; the rest of the batch comes back moments later.
                verdicts.extend(
                    self.record(ends.behind_probe(a, now_ms=now_ms())) for a in route.attempts[1:]
                )
                route.attempts = route.attempts[:1]
            tallies.setdefault(
                circuit.name, _Tally(circuit, probing=admission.verdict == breaker.PROBE)
            )
            posting.append(route)
        answers, started = self._start(posting, verdicts)
        self.keep(started)  # a slot for each post started (a 401's repost keeps its own)
        refused: dict[int, list[Attempt]] = {}
        # The transport answers every post within its deadline; the margin only guards a bug.
        patience = parts.client.timeout_seconds + parts.client.connect_timeout_seconds + 60
        for _ in range(started):
            try:
                route, attempt, result = answers.get(timeout=patience)
            except queue.Empty:
                raise RuntimeError(
                    "the HTTP transport did not answer within its deadline"
                ) from None
            tallies[route.breaker.name].count(result)
            if self.trace is not None:
                if isinstance(result, ApiResponse):
                    self.trace.answered(
                        attempt.message_id, result.status, result.correlation_id, None
                    )
                else:
                    self.trace.answered(attempt.message_id, None, None, result.kind)
            outcome = outcomes.classify(
                result,
                attempt=attempt.claim.attempt,
                policy=parts.policy,
                token_refreshed=token_refreshed,
            )
            if isinstance(outcome, outcomes.RefreshToken):
                refused.setdefault(id(route), []).append(attempt)
                continue
            if outcomes.slows_down(outcome):
                parts.rate_limiter.penalize()  # a 429: every worker slows down for a while
            verdicts.append(
                self.record(ends.after_answer(attempt, result, outcome, now_ms=now_ms()))
            )
            self.keep(self.slots - 1)  # written: a crash from now on cannot post it twice
        for tally in tallies.values():
            tally.flush()
        again = []
        for route in posting:
            if id(route) in refused:
                route.attempts = refused[id(route)]
                again.append(route)
        return again

    def _start(self, routes: list[_Route], verdicts: list[str]) -> tuple[Answers, int]:
        """Start the posts (each after its rate-limit permits); their answers, and how many."""
        parts = self.parts
        client = parts.client
        limiter = parts.rate_limiter
        deadline = limiter.deadline()  # one wait budget for the batch: the lease covers it
        answers: Answers = queue.SimpleQueue()
        started = 0
        for route in routes:
            together: list[tuple[Message, Reply]] = []
            own = route.limiter
            for attempt in route.attempts:
                if self.stopping():
                    verdicts.append(self.record(ends.handed_back(attempt, now_ms=now_ms())))
                    continue
                late = ends.past_deadline(attempt, now_ms=now_ms())
                if late is not None:  # it waited for its token past its deadline: never posted
                    verdicts.append(self.record(late))
                    continue
                reply = functools.partial(_answered, answers, route, attempt)
                if own is None and not limiter.policy.enabled:
                    together.append((attempt.message, reply))  # no pace to keep: all at once
                    if self.trace is not None:
                        self.trace.posting(attempt.message_id)
                    continue
                permit = Permit(True, 0.0) if own is None else own.acquire(deadline)
                if permit.granted:
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
                late = ends.past_deadline(attempt, now_ms=now_ms())
                if late is not None:  # it waited for its permit past its deadline
                    verdicts.append(self.record(late))
                    continue
                if self.trace is not None:
                    self.trace.posting(attempt.message_id)
                client.start([(attempt.message, reply)], route.token, route.base_url)
                started += 1
            if together:
                client.start(together, route.token, route.base_url)
                started += len(together)
        return answers, started

    def record(self, end: End) -> str:
        """Write how a message's attempt ended (before the task is acknowledged) and log it.

        The one place an end reaches the store and the log; returns the message's verdict.
        With tracing on, inside the message's ``notify.outcome`` span (its log line carries the
        trace id), which ends the message's span.
        """
        if self.trace is None:
            return self._write(end)
        with self.trace.outcome(end.message_id) as verdict:
            verdict.append(self._write(end))
        return verdict[0]

    def _write(self, end: End) -> str:
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
                        # First: Sentry keeps an event's first ten extras, and tags by reason.
                        "reason": failure.reason,
                        **_log_fields(end.message_id, end.claim, "dead", end.entry),
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
            case CompanyWaiting():
                store.defer(end.message_id, end.owner, end.due_ms)
                log.info(
                    "waiting %s: company %s needs to be reconnected, looked at again in %.1fs "
                    "(dead letter %s after %s)",
                    end.message_id,
                    end.company,
                    max(0, end.due_ms - now_ms()) / 1000,
                    outcomes.COMPANY_DISCONNECTED,
                    iso_utc(end.grace_ends_ms),
                    extra={"message_id": end.message_id, "company": end.company},
                )
                return "waiting"

    def _signed(self, failure: Failure) -> Failure:
        # A dead letter says which task and worker gave up on it.
        return dataclasses.replace(failure, task_id=self.task_id, worker=self.parts.worker_name)
