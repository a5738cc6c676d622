"""The one place that decides what an attempt's answer means.

Outcome of one attempt::

    Outcome
     ├── Delivered                  2xx: never send this request again
     ├── RefreshToken               first 401 of an attempt: fetch a fresh token, post once more
     ├── Retry(delay_seconds)       5xx, 408, 429, timeout, connection or protocol error,
     │                              while attempts remain (Retry-After wins when longer)
     └── GiveUp(reason)             failed for good: a dead letter, with why
          ├── retries_exhausted     a passing failure on the last attempt
          ├── unauthorized          401 again with a fresh token
          ├── api_rejected          any other 4xx (status and errors[] kept)
          ├── unexpected_status     1xx/3xx: the API never answers these, so a human must look
          ├── invalid_request       ┐
          ├── template_not_allowed  ├ from validation: never sent
          ├── url_not_allowed       ┘
          ├── malformed_message     the queued task could not be read at all
          └── expired               its deadline passed before it could be posted (never
                                    posted; decided at the claim, worker.delivery.ends)

``classify`` is pure: it takes the answer (``ApiResponse``, or ``TransportFailure`` when there was
none: the types are defined here, where they are read; ``worker.concur.client`` makes them), the
attempt number and the retry policy, and returns an ``Outcome``; the worker applies it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from worker.rules.retries import RetryPolicy


@dataclass(frozen=True, slots=True)
class ApiResponse:
    """What the API answered, reduced to what decisions and dead letters need."""

    status: int
    correlation_id: str | None = None
    errors: list[dict[str, str | None]] = field(default_factory=list)
    retry_after_seconds: float | None = None
    elapsed_seconds: float = 0.0


@dataclass(frozen=True, slots=True)
class TransportFailure:
    """No HTTP answer: ``kind`` is ``timeout``, ``connect`` or ``protocol``."""

    kind: str
    detail: str
    elapsed_seconds: float = 0.0


RETRYABLE_4XX = frozenset({408, 429})

# Reason codes of dead letters (stable: README, the CLI and the HTTP service use them).
RETRIES_EXHAUSTED = "retries_exhausted"
UNAUTHORIZED = "unauthorized"
API_REJECTED = "api_rejected"
UNEXPECTED_STATUS = "unexpected_status"
INVALID_REQUEST = "invalid_request"
TEMPLATE_NOT_ALLOWED = "template_not_allowed"
URL_NOT_ALLOWED = "url_not_allowed"
MALFORMED_MESSAGE = "malformed_message"
# The message's company is disconnected, unknown, or waited past its reconnect grace.
COMPANY_DISCONNECTED = "company_disconnected"
# The message's deadline (expires_at, Expires-At, NOTIFY_PARTNER_EXPIRY_SECONDS) passed before it
# was posted; it never was.
EXPIRED = "expired"
REASONS = (
    RETRIES_EXHAUSTED,
    UNAUTHORIZED,
    API_REJECTED,
    UNEXPECTED_STATUS,
    INVALID_REQUEST,
    TEMPLATE_NOT_ALLOWED,
    URL_NOT_ALLOWED,
    MALFORMED_MESSAGE,
    COMPANY_DISCONNECTED,
    EXPIRED,
)


@dataclass(frozen=True, slots=True)
class Delivered:
    """The API accepted the message."""

    status: int


@dataclass(frozen=True, slots=True)
class RefreshToken:
    """The token was refused once: refresh it and post again at once."""


@dataclass(frozen=True, slots=True)
class Retry:
    """A passing failure: try again after ``delay_seconds``."""

    delay_seconds: float
    cause: str  # "http_503", "timeout", ...
    status: int | None = None


@dataclass(frozen=True, slots=True)
class GiveUp:
    """Failed for good: keep it for an operator, with why."""

    reason: str
    detail: str
    status: int | None = None
    errors: list[dict[str, str | None]] = field(default_factory=list)


Outcome = Delivered | RefreshToken | Retry | GiveUp


def _retry_or_give_up(
    cause: str,
    status: int | None,
    retry_after: float | None,
    attempt: int,
    policy: RetryPolicy,
    errors: list[dict[str, str | None]],
    rng: random.Random | None,
) -> Retry | GiveUp:
    if policy.can_retry(attempt):
        return Retry(policy.delay_seconds(attempt, retry_after, rng), cause, status)
    return GiveUp(
        RETRIES_EXHAUSTED, f"{cause} on attempt {attempt} of {policy.max_attempts}", status, errors
    )


def classify(
    result: ApiResponse | TransportFailure,
    *,
    attempt: int,
    policy: RetryPolicy,
    token_refreshed: bool = False,
    rng: random.Random | None = None,
) -> Outcome:
    """What to do after attempt number ``attempt`` (1-based) got ``result``."""
    if isinstance(result, TransportFailure):
        return _retry_or_give_up(result.kind, None, None, attempt, policy, [], rng)
    status = result.status
    if 200 <= status < 300:
        return Delivered(status)
    if status == 401:
        if not token_refreshed:
            return RefreshToken()
        return GiveUp(UNAUTHORIZED, "401 with a freshly fetched token", status, result.errors)
    if status >= 500 or status in RETRYABLE_4XX:
        return _retry_or_give_up(
            f"http_{status}",
            status,
            result.retry_after_seconds,
            attempt,
            policy,
            result.errors,
            rng,
        )
    if 400 <= status < 500:
        return GiveUp(
            API_REJECTED, f"the API refused the message ({status})", status, result.errors
        )
    return GiveUp(UNEXPECTED_STATUS, f"unexpected HTTP status {status}", status, result.errors)


def slows_down(outcome: Outcome) -> bool:
    """Whether an attempt's outcome means the API asked everyone to slow down (a 429)."""
    if isinstance(outcome, Retry):
        return outcome.cause == "http_429"
    return isinstance(outcome, GiveUp) and outcome.status == 429
