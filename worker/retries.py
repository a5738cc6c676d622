"""The retry policy as data: exponential backoff with jitter, a cap, and a number of attempts.

Defaults follow Concur's advice (wait about five minutes after a 503): a 60 s base doubling to a
300 s cap spreads eight attempts over roughly half an hour.
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
