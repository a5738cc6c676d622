"""How an attempt ends: every end as a value, and the pure decisions that choose one.

An attempt of a claimed message ends in one of these, and ``worker.delivery.attempts`` records
each in the store and logs it in one place (its verdict in brackets)::

    NotAttempted   the claim was refused: already finished, a stale copy, or held by another
                   worker ("done", "stale", "busy"); nothing is written
    Delivered      a 2xx ("delivered")
    RetryLater     a passing failure with attempts left: due again after the backoff ("retry")
    DeadLetter     failed for good, kept for an operator with why ("dead:<reason>"): the API's
                   answer, an invalid request, attempts started again and again and never
                   finished, or its deadline passed before it was posted (``expired``)
    Unreadable     the queued task was not a message at all ("dead:malformed_message")
    NoToken        no Concur token could be had ("deferred", with a ``token_unavailable`` entry)
    RateLimited    no rate-limit permit in time ("deferred")
    Paused         the circuit breaker held the posts ("paused")
    HandedBack     a warm shutdown began before the post started ("handed_back")
    CompanyWaiting the message's company needs an operator to reconnect it ("waiting"): due
                   again at the next recheck, never past the end of its reconnect grace

The last five go back on the schedule **without spending an attempt**: nothing was posted.
A message with a deadline (``expires_ms``) never waits past it: the store puts it back on the
schedule no later than its deadline, the claim past it answers ``expired`` (``after_claim``:
a dead letter ``expired``), and a post whose deadline passed while it waited for its permit or
token is not started (``past_deadline``). A cancelled message's claim is refused as ``done``.

The decisions take the claim, the answer, the policy and the time (``now_ms``, injected), and do
no I/O; what an API answer means is ``worker.rules.outcomes.classify``'s to say, and
``after_answer`` turns that into the end to record.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

from worker.queue.envelopes import Malformed
from worker.rules import outcomes
from worker.rules.allowlist import AllowList
from worker.rules.outcomes import ApiResponse, TransportFailure
from worker.rules.retries import COMPANY_RECHECK_JITTER, CompanyPolicy, RetryPolicy
from worker.rules.validation import InvalidRequest, validate_wire
from worker.shapes.models import CompanyState, Message
from worker.shapes.times import iso_utc
from worker.store.codec import AttemptRecord, Claim, Failure

PAUSE_JITTER_MS = 1000  # spreads the messages a breaker paused over a second when it lets go
TOKEN_UNAVAILABLE = "token_unavailable"  # the cause of an attempt deferred for want of a token


@dataclass(slots=True)
class Attempt:
    """One claimed, valid message on its way to the API (started when it was found valid)."""

    message_id: str
    owner: str
    claim: Claim
    message: Message
    started_ms: int


@dataclass(frozen=True, slots=True)
class NotAttempted:
    """The claim was refused (``verdict``: ``done``, ``stale`` or ``busy``); nothing to do."""

    message_id: str
    verdict: str
    state: str


@dataclass(frozen=True, slots=True)
class Delivered:
    """The API accepted the message."""

    message_id: str
    claim: Claim
    entry: AttemptRecord


@dataclass(frozen=True, slots=True)
class RetryLater:
    """A passing failure: the message is due again at ``due_ms``."""

    message_id: str
    owner: str
    claim: Claim
    entry: AttemptRecord
    due_ms: int
    delay_seconds: float
    cause: str


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """Failed for good; ``entry`` is the attempt's record when a post was answered."""

    message_id: str
    owner: str
    claim: Claim
    failure: Failure
    entry: AttemptRecord | None = None


@dataclass(frozen=True, slots=True)
class Unreadable:
    """A queued task that is no message: dead-lettered with what could be read of it."""

    message_id: str
    failure: Failure
    request: str  # the stored request: the raw excerpt, as JSON


@dataclass(frozen=True, slots=True)
class NoToken:
    """No Concur token: due again after the backoff, with an entry in the message's history."""

    message_id: str
    owner: str
    entry: AttemptRecord
    due_ms: int
    delay_seconds: float
    error: str


@dataclass(frozen=True, slots=True)
class RateLimited:
    """No rate-limit permit within the batch's wait: due again when a slot may be free."""

    message_id: str
    owner: str
    due_ms: int
    waited_seconds: float
    retry_in_seconds: float


@dataclass(frozen=True, slots=True)
class Paused:
    """The circuit breaker holds the posts: due again when it may let one through."""

    message_id: str
    owner: str
    due_ms: int


@dataclass(frozen=True, slots=True)
class HandedBack:
    """The worker is shutting down: due now, for whichever worker is up."""

    message_id: str
    owner: str
    due_ms: int


@dataclass(frozen=True, slots=True)
class CompanyWaiting:
    """The company needs to be reconnected: due again at ``due_ms`` (its grace ends at
    ``grace_ends_ms``), the attempt not spent."""

    message_id: str
    owner: str
    company: str
    due_ms: int
    grace_ends_ms: int


End = (
    NotAttempted
    | Delivered
    | RetryLater
    | DeadLetter
    | Unreadable
    | NoToken
    | RateLimited
    | Paused
    | HandedBack
    | CompanyWaiting
)


def unreadable(malformed: Malformed) -> Unreadable:
    """The end of a task entry that could not be read as a message."""
    return Unreadable(
        malformed.id,
        Failure(outcomes.MALFORMED_MESSAGE, malformed.detail),
        json.dumps({"raw": malformed.raw}),
    )


def after_claim(
    message_id: str,
    owner: str,
    claim: Claim,
    *,
    policy: RetryPolicy,
    allowlist: AllowList,
    now_ms: int,
) -> Attempt | NotAttempted | DeadLetter:
    """After the claim: an ``Attempt`` to post, or how the message ends without a post."""
    if claim.verdict == "expired":
        return expired(message_id, owner, claim)
    if claim.verdict != "go":
        return NotAttempted(message_id, claim.verdict, claim.state)
    if claim.attempt > policy.max_attempts:
        # Only a worker that died mid-attempt, again and again, gets here: stop handing it out.
        return DeadLetter(
            message_id,
            owner,
            claim,
            Failure(
                outcomes.RETRIES_EXHAUSTED,
                f"{claim.attempt - 1} attempts were started and none finished",
            ),
        )
    try:
        message = validate_wire(claim.request, allowlist)
    except InvalidRequest as invalid:
        errors: list[dict[str, str | None]] = [
            {"errorId": None, "errorCode": p.code, "errorMessage": p.message}
            for p in invalid.problems
        ]
        return DeadLetter(
            message_id, owner, claim, Failure(invalid.reason, str(invalid), errors=errors)
        )
    return Attempt(message_id, owner, claim, message, now_ms)


def expired(message_id: str, owner: str, claim: Claim) -> DeadLetter:
    """A message whose deadline (``claim.expires_ms``) passed before it was posted: a dead
    letter ``expired``; it is never posted."""
    when = iso_utc(claim.expires_ms)
    deadline = f"its deadline ({when})" if when else "its deadline"
    return DeadLetter(
        message_id,
        owner,
        claim,
        Failure(outcomes.EXPIRED, f"{deadline} passed before it could be posted"),
    )


def past_deadline(attempt: Attempt, *, now_ms: int) -> DeadLetter | None:
    """Just before its post starts: a dead letter ``expired`` when the deadline passed while the
    message waited for its token or rate-limit permit (None: post it)."""
    deadline = attempt.claim.expires_ms
    if deadline is None or now_ms < deadline:
        return None
    return expired(attempt.message_id, attempt.owner, attempt.claim)


def attempt_record(
    attempt: Attempt, answer: ApiResponse | TransportFailure, outcome: str
) -> AttemptRecord:
    """The history entry of an answered post (``outcome``: delivered, retry or dead)."""
    if isinstance(answer, ApiResponse):
        return AttemptRecord(
            attempt.claim.attempt,
            attempt.started_ms,
            outcome,
            answer.status,
            f"http_{answer.status}",
            int(answer.elapsed_seconds * 1000),
            answer.correlation_id,
        )
    return AttemptRecord(
        attempt.claim.attempt,
        attempt.started_ms,
        outcome,
        None,
        answer.kind,
        int(answer.elapsed_seconds * 1000),
        None,
    )


def after_answer(
    attempt: Attempt,
    answer: ApiResponse | TransportFailure,
    outcome: outcomes.Delivered | outcomes.Retry | outcomes.GiveUp,
    *,
    now_ms: int,
) -> Delivered | RetryLater | DeadLetter:
    """The end of a post the API answered, given what ``outcomes.classify`` made of it."""
    if isinstance(outcome, outcomes.Delivered):
        return Delivered(
            attempt.message_id, attempt.claim, attempt_record(attempt, answer, "delivered")
        )
    if isinstance(outcome, outcomes.Retry):
        return RetryLater(
            attempt.message_id,
            attempt.owner,
            attempt.claim,
            attempt_record(attempt, answer, "retry"),
            now_ms + int(outcome.delay_seconds * 1000),
            outcome.delay_seconds,
            outcome.cause,
        )
    return DeadLetter(
        attempt.message_id,
        attempt.owner,
        attempt.claim,
        Failure(
            outcome.reason,
            outcome.detail,
            status=outcome.status,
            errors=outcome.errors,
            correlation_id=answer.correlation_id if isinstance(answer, ApiResponse) else None,
        ),
        attempt_record(attempt, answer, "dead"),
    )


def no_token(
    attempt: Attempt,
    error: str,
    *,
    policy: RetryPolicy,
    now_ms: int,
    rng: random.Random | None = None,
) -> NoToken:
    """No token could be had: the message waits out the backoff, its attempt not spent.

    A credentials outage is not the message's fault, however long it lasts.
    """
    delay = policy.backoff_seconds(max(attempt.claim.attempt, 1), rng)
    entry = AttemptRecord(
        attempt.claim.attempt,
        attempt.started_ms,
        "deferred",
        None,
        TOKEN_UNAVAILABLE,
        now_ms - attempt.started_ms,
        None,
    )
    return NoToken(
        attempt.message_id, attempt.owner, entry, now_ms + int(delay * 1000), delay, error
    )


def rate_limited(
    attempt: Attempt, *, waited_seconds: float, retry_in_seconds: float, now_ms: int
) -> RateLimited:
    """No permit in time: due again in ``retry_in_seconds`` (never a dead letter for this)."""
    return RateLimited(
        attempt.message_id,
        attempt.owner,
        now_ms + int(retry_in_seconds * 1000),
        waited_seconds,
        retry_in_seconds,
    )


def paused(attempt: Attempt, not_before_ms: int, *, rng: random.Random | None = None) -> Paused:
    """Held by the breaker until ``not_before_ms``, plus up to ``PAUSE_JITTER_MS``.

    The jitter keeps the paused messages of every worker from coming back all at once.
    """
    return Paused(
        attempt.message_id,
        attempt.owner,
        not_before_ms + (rng or random).randint(0, PAUSE_JITTER_MS),
    )


def behind_probe(attempt: Attempt, *, now_ms: int, rng: random.Random | None = None) -> Paused:
    """A half-open breaker's one probe goes first: the rest of its batch comes back moments
    later (between one and two ``PAUSE_JITTER_MS``)."""
    return Paused(
        attempt.message_id,
        attempt.owner,
        now_ms + (rng or random).randint(PAUSE_JITTER_MS, 2 * PAUSE_JITTER_MS),
    )


def handed_back(attempt: Attempt, *, now_ms: int) -> HandedBack:
    """A warm shutdown began before the post started: due now, for whichever worker is up."""
    return HandedBack(attempt.message_id, attempt.owner, now_ms)


def _company_gone(attempt: Attempt, company: str, why: str) -> DeadLetter:
    return DeadLetter(
        attempt.message_id,
        attempt.owner,
        attempt.claim,
        Failure(outcomes.COMPANY_DISCONNECTED, f"company {company} {why}"),
    )


def for_company(
    attempt: Attempt,
    company: str,
    state: CompanyState | None,
    state_ms: int | None,
    *,
    policy: CompanyPolicy,
    now_ms: int,
    rng: random.Random | None = None,
) -> Attempt | CompanyWaiting | DeadLetter:
    """Whether a registry company's message is posted now, waits, or is dead-lettered.

    ``state``: the company's (None: not in the registry); ``state_ms``: when it took that state.
    Connected: posted. Disconnected or unknown: a dead letter ``company_disconnected`` at once.
    Waiting for a reconnection: due again at the next recheck (with a little jitter), never
    later than the end of its grace (``state_ms`` + ``grace_seconds``); once the grace is over,
    a dead letter ``company_disconnected``.
    """
    if state == "connected":
        return attempt
    if state is None:
        return _company_gone(attempt, company, "is not in the company registry")
    if state == "disconnected":
        return _company_gone(attempt, company, "is disconnected")
    grace_ends_ms = (now_ms if state_ms is None else state_ms) + int(policy.grace_seconds * 1000)
    if now_ms >= grace_ends_ms:
        return _company_gone(
            attempt,
            company,
            f"was not reconnected within its grace of {policy.grace_seconds:g}s",
        )
    jitter = (rng or random).uniform(0, COMPANY_RECHECK_JITTER)
    recheck_ms = now_ms + int(policy.recheck_seconds * (1 + jitter) * 1000)
    return CompanyWaiting(
        attempt.message_id, attempt.owner, company, min(grace_ends_ms, recheck_ms), grace_ends_ms
    )
