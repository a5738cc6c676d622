"""Retry policies as data: a message's attempts at the API, and commands to Redis.

``RetryPolicy`` is exponential backoff with jitter, a cap, and a number of attempts. Defaults
follow Concur's advice (wait about five minutes after a 503): a 60 s base doubling to a 300 s cap
spreads eight attempts over roughly half an hour.

``RedisPatience`` is how long a Redis outage is waited out, the one rule for every Redis command
(``worker.store.redisclient`` hands it to redis-py as the clients' retry).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from worker.settings import Settings


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """When to try again, and when to give up."""

    max_attempts: int = 8
    backoff_base_seconds: float = 60.0
    backoff_max_seconds: float = 300.0
    jitter_ratio: float = 0.2
    retry_after_max_seconds: float = 3600.0

    @classmethod
    def from_settings(cls, settings: Settings) -> RetryPolicy:
        """The policy the settings describe."""
        return cls(
            max_attempts=settings.max_attempts,
            backoff_base_seconds=settings.backoff_base_seconds,
            backoff_max_seconds=settings.backoff_max_seconds,
            jitter_ratio=settings.backoff_jitter_ratio,
            retry_after_max_seconds=settings.retry_after_max_seconds,
        )

    def can_retry(self, attempt: int) -> bool:
        """Whether attempt number ``attempt`` (1-based) may be followed by another."""
        return attempt < self.max_attempts

    def backoff_seconds(self, attempt: int, rng: random.Random | None = None) -> float:
        """The wait after failed attempt ``attempt`` (1-based): base * 2^(attempt-1), capped.

        Jitter takes off up to ``jitter_ratio`` of the wait so that a burst of failures does not
        come back as a burst; unlike full jitter it never collapses a wait to zero.
        """
        exponent = min(max(attempt - 1, 0), 62)
        nominal = min(self.backoff_max_seconds, self.backoff_base_seconds * (2.0**exponent))
        draw = (rng or random).random()
        return nominal * (1.0 - self.jitter_ratio * draw)

    def delay_seconds(
        self, attempt: int, retry_after_seconds: float | None, rng: random.Random | None = None
    ) -> float:
        """The wait before the next attempt: our backoff, or Retry-After when that is longer."""
        delay = self.backoff_seconds(attempt, rng)
        if retry_after_seconds is not None:
            delay = max(delay, min(retry_after_seconds, self.retry_after_max_seconds))
        return delay


@dataclass(frozen=True, slots=True)
class RedisPatience:
    """How long a command waits out a Redis outage, and the pauses between its tries.

    Workers and producers wait ``NOTIFY_REDIS_PATIENCE_SECONDS``: an outcome that cannot be
    written leaves its message in flight until its lease ends, when it is attempted again (a
    second post after a 2xx), and a claim that fails leaves a task's messages to the publish
    grace period; a Redis restart or a Sentinel failover takes seconds. Where someone waits for
    the answer (the HTTP service, the CLI), ``ANSWERING`` gives up soon, with a clear error.
    """

    seconds: float
    first_pause_seconds: float = 0.05
    max_pause_seconds: float = 1.0

    @classmethod
    def from_settings(cls, settings: Settings) -> RedisPatience:
        """The workers' and producers' patience (``NOTIFY_REDIS_PATIENCE_SECONDS``)."""
        return cls(seconds=settings.redis_patience_seconds)

    def pause_seconds(self, failures: int) -> float:
        """The pause after the ``failures``-th failed try: doubling from the first, capped."""
        exponent = min(max(failures - 1, 0), 62)
        return min(self.max_pause_seconds, self.first_pause_seconds * (2.0**exponent))

    def may_try_again(self, waited_seconds: float, failures: int) -> bool:
        """Whether another try fits in the patience after ``waited_seconds`` of failures."""
        return waited_seconds + self.pause_seconds(failures) <= self.seconds


# The HTTP service and the CLI: a partner or an operator waits for the answer.
ANSWERING = RedisPatience(seconds=2.0)


# How often a message of a company waiting to be reconnected is looked at again: a reconnection
# is noticed within this time, and a backlog of such messages costs one claim each per recheck.
COMPANY_RECHECK_SECONDS = 60.0
COMPANY_RECHECK_JITTER = 0.1  # up to this share of the recheck is added, spreading the backlog


@dataclass(frozen=True, slots=True)
class CompanyPolicy:
    """How long a company's messages wait for its reconnection, and how often they look."""

    grace_seconds: float = 86_400.0
    recheck_seconds: float = COMPANY_RECHECK_SECONDS

    @classmethod
    def from_settings(cls, settings: Settings) -> CompanyPolicy:
        """The policy the settings describe (``NOTIFY_COMPANY_RECONNECT_GRACE_SECONDS``)."""
        return cls(grace_seconds=settings.company_reconnect_grace_seconds)
