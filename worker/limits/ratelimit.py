"""The global rate limit: one pace for every worker, kept in Redis (GCRA with reservations).

``NOTIFY_RATE_LIMIT_PER_SECOND`` posts per second are shared by all workers through one key
(``keys.RATE_LIMIT``, the generic cell rate algorithm's "theoretical arrival time"). One Lua
script, timed by Redis' own clock (``TIME``) so that worker clocks do not matter, either
*reserves* the next free slot and says how long to sleep until it, or, when that slot is further
away than the caller may wait, reserves nothing and says how far away it is. A reservation is
the only round trip per post: waiting workers do not poll each other's leftovers, they each
sleep until their own slot.

``NOTIFY_RATE_LIMIT_BURST`` slots may be used at once after an idle spell (GCRA's tolerance);
the steady pace is the rate. In any one second at most ``rate + burst`` posts start. The burst
defaults to 1, so a partner's quota of N per second is not exceeded by more than one post.

A 429 from the API sets ``keys.RATE_LIMIT_PENALTY`` (the interval multiplier, 2 = half pace)
for ``NOTIFY_RATE_LIMIT_PENALTY_SECONDS``; every worker's next reservation honours it, and each
further 429 starts the penalty window again. With the limit off (rate 0) nothing here touches
Redis.

How a worker waits (``RateLimiter.acquire``, decided by the pure ``next_step``): an attempt has
``RATE_LIMIT_MAX_WAIT_SECONDS`` in all. A slot within the time left is reserved and slept for;
otherwise the worker sleeps a little (at most ``POLL_CAP_SECONDS``) and asks again, and once the
time is up the message goes back on the schedule (``MessageStore.defer``), costing no attempt.
It is never dead-lettered for the rate limit.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from redis import Redis

from worker.settings import RATE_LIMIT_MAX_WAIT_SECONDS, Settings
from worker.store import keys

POLL_CAP_SECONDS = 1.0
PENALTY_FACTOR = 2.0  # a 429 doubles the interval between posts (half pace)

_RESERVE = """
-- KEYS: tat, penalty ; ARGV: interval us, burst, max wait us
-- Returns {reserved 0|1, wait us, interval multiplier in force}.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local factor = tonumber(redis.call('GET', KEYS[2]) or '1') or 1
if factor < 1 then factor = 1 end
local interval = tonumber(ARGV[1]) * factor
local tat = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
if tat < now then tat = now end
local wait = tat - interval * (tonumber(ARGV[2]) - 1) - now
if wait < 0 then wait = 0 end
if wait > tonumber(ARGV[3]) then
  return {0, string.format('%.0f', wait), tostring(factor)}
end
local new_tat = tat + interval
-- Formatted by hand: Lua would print an epoch in microseconds as 1.7e+15 and lose precision.
redis.call('SET', KEYS[1], string.format('%.0f', new_tat),
           'PX', math.ceil((new_tat - now) / 1000) + 1000)
return {1, string.format('%.0f', wait), tostring(factor)}
"""


@dataclass(frozen=True, slots=True)
class RateLimitPolicy:
    """The pace every worker shares; ``per_second`` 0 means no limit."""

    per_second: float = 0.0
    burst: int = 1
    max_wait_seconds: float = RATE_LIMIT_MAX_WAIT_SECONDS
    penalty_seconds: float = 60.0
    penalty_factor: float = PENALTY_FACTOR

    @classmethod
    def from_settings(cls, settings: Settings) -> RateLimitPolicy:
        """The policy the settings describe; an unset burst is 1 (a strict pace).

        1 is the capacity of Celery's own token bucket too. A burst of one second's worth (the
        earlier default) let two workers post 33 times in one second at a rate of 20.
        """
        return cls(
            per_second=settings.rate_limit_per_second,
            burst=settings.rate_limit_burst,
            penalty_seconds=settings.rate_limit_penalty_seconds,
        )

    @property
    def enabled(self) -> bool:
        """Whether posts are paced at all."""
        return self.per_second > 0

    @property
    def interval_us(self) -> int:
        """Microseconds between two posts at full pace."""
        return max(1, round(1_000_000 / self.per_second)) if self.enabled else 0


@dataclass(frozen=True, slots=True)
class Reservation:
    """The script's answer: a reserved slot ``wait_seconds`` from now, or how far the next is."""

    reserved: bool
    wait_seconds: float
    penalty_factor: float = 1.0


@dataclass(frozen=True, slots=True)
class Step:
    """What a waiting worker does next: ``go`` (after sleeping), ``poll`` again, or ``defer``."""

    action: str  # go | poll | defer
    seconds: float  # go/poll: how long to sleep first; defer: when to try the message again


def next_step(reservation: Reservation, remaining_seconds: float) -> Step:
    """Decide after one reservation request, with ``remaining_seconds`` of the attempt's wait left.

    Pure: the whole waiting policy is here, the I/O is in ``RateLimiter.acquire``.
    """
    if reservation.reserved:
        return Step("go", max(0.0, reservation.wait_seconds))
    if remaining_seconds <= 0:
        # Come back when the slot asked about would have been free; the mover republishes it.
        return Step("defer", max(reservation.wait_seconds, POLL_CAP_SECONDS))
    # Holding the message for the attempt's wait budget (rather than deferring at once) keeps a
    # worker from churning through the whole queue, claim and defer, while the pace is saturated.
    return Step("poll", min(POLL_CAP_SECONDS, remaining_seconds))


@dataclass(frozen=True, slots=True)
class Permit:
    """The end of ``acquire``: a permit (``granted``) or when to try the message again."""

    granted: bool
    waited_seconds: float
    retry_in_seconds: float = 0.0


class RateLimiter:
    """Reserves posting slots in Redis; a no-op (no Redis at all) when the policy is off."""

    def __init__(
        self,
        redis: Redis,
        policy: RateLimitPolicy,
        *,
        key: str = keys.RATE_LIMIT,
        penalty_key: str = keys.RATE_LIMIT_PENALTY,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.redis = redis
        self.policy = policy
        self.key = key
        self.penalty_key = penalty_key
        self._sleep = sleep
        self._clock = clock
        self._reserve = redis.register_script(_RESERVE)

    def reserve(self, max_wait_seconds: float) -> Reservation:
        """One round trip: reserve the next slot if it is at most ``max_wait_seconds`` away."""
        reserved, wait_us, factor = self._reserve(
            keys=[self.key, self.penalty_key],
            args=[self.policy.interval_us, self.policy.burst, int(max_wait_seconds * 1_000_000)],
        )
        return Reservation(bool(int(reserved)), int(wait_us) / 1_000_000, float(factor))

    def acquire(self, deadline: float) -> Permit:
        """Wait for a permit until the monotonic ``deadline``; free when the limit is off."""
        if not self.policy.enabled:
            return Permit(True, 0.0)
        started = self._clock()
        while True:
            remaining = deadline - self._clock()
            step = next_step(self.reserve(max(0.0, remaining)), remaining)
            if step.action == "defer":
                return Permit(False, self._clock() - started, step.seconds)
            if step.seconds > 0:
                self._sleep(step.seconds)
            if step.action == "go":
                return Permit(True, self._clock() - started)

    def deadline(self) -> float:
        """The monotonic time until which one attempt may wait for its permits."""
        return self._clock() + self.policy.max_wait_seconds

    def penalize(self) -> None:
        """After a 429: slow every worker down for the penalty window (a no-op when off)."""
        if not self.policy.enabled or self.policy.penalty_seconds <= 0:
            return
        self.redis.set(
            self.penalty_key,
            repr(self.policy.penalty_factor),
            px=max(1, int(self.policy.penalty_seconds * 1000)),
        )

    def penalty_factor(self) -> float:
        """The interval multiplier in force now (1.0 = no penalty)."""
        raw = self.redis.get(self.penalty_key)
        try:
            return max(1.0, float(raw)) if raw else 1.0
        except (TypeError, ValueError):
            return 1.0
