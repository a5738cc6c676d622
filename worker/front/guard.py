"""Failed key checks, counted in Redis: guessing keys is slowed across every ``notify api``.

A wrong key (a console login, an API ``Authorization`` header) counts once for the client's
address and once over all addresses, in fixed windows of ``NOTIFY_AUTH_FAILURE_WINDOW_SECONDS``
(a Redis counter created with its expiry and incremented in one transaction). Past
``NOTIFY_AUTH_FAILURES_PER_ADDRESS`` for an address, or ``NOTIFY_AUTH_FAILURES_TOTAL`` over all,
every key check from that address (or from anyone) answers 429 until the window ends, whether
the key is right or not: a right guess then tells nothing.

Only failures touch Redis: each one reads back both counters, and the process remembers a block
until it ends, so a request with a good key costs no Redis call. Another process learns of a
block at its own first failure in it; the chance that a guess which happens to be right is
exactly that request is the key's guessing odds, which the key rules (``settings.key_weakness``)
keep negligible.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request

from worker.settings import Settings
from worker.store import keys

log = logging.getLogger(__name__)

# The block that stands for "every address" in the process's memory of blocks.
_EVERYONE = ""


@dataclass(frozen=True, slots=True)
class FailureLimits:
    """How many failed key checks a window allows, per address and over all addresses."""

    window_seconds: int
    per_address: int
    total: int

    @classmethod
    def from_settings(cls, settings: Settings) -> FailureLimits:
        """Read the limits from the settings."""
        return cls(
            window_seconds=settings.auth_failure_window_seconds,
            per_address=settings.auth_failures_per_address,
            total=settings.auth_failures_total,
        )


def client_address(request: Request) -> str:
    """The client's address as the limits count it (uvicorn has already applied a trusted
    proxy's ``X-Forwarded-For``: ``NOTIFY_SERVICE_TRUSTED_PROXIES``)."""
    host = request.client.host if request.client is not None else ""
    # An address is at most 45 characters (IPv6); anything else a proxy passed on is one name.
    return host if 0 < len(host) <= 64 and host.isprintable() else "unknown"


def blocks_after_failure(
    limits: FailureLimits,
    address_count: int,
    address_ttl: float,
    total_count: int,
    total_ttl: float,
) -> dict[str, float]:
    """The blocks (``address`` or everyone) a failure leaves, each with its seconds to run.

    The counts are the windows' counts with this failure; the TTLs the seconds their windows
    have left (Redis: -1 without expiry, which never happens here but is read as a full window).
    """
    found: dict[str, float] = {}
    if address_count > limits.per_address:
        found["address"] = address_ttl if address_ttl > 0 else limits.window_seconds
    if total_count > limits.total:
        found[_EVERYONE] = total_ttl if total_ttl > 0 else limits.window_seconds
    return found


class FailureLimiter:
    """Counts failed key checks in Redis and remembers the blocks they caused."""

    def __init__(
        self,
        redis: Any,
        limits: FailureLimits,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.redis = redis
        self.limits = limits
        self.clock = clock
        # address (or everyone) -> when its block ends, on ``clock``; only blocks are kept, and
        # the totals cap how many addresses can be blocked in one window.
        self._blocked_until: dict[str, float] = {}

    def retry_after(self, address: str) -> float | None:
        """Seconds until ``address`` may present a key again, or None: no I/O."""
        now = self.clock()
        ends = [
            until
            for who in (address, _EVERYONE)
            if (until := self._blocked_until.get(who)) is not None and until > now
        ]
        return max(ends) - now if ends else None

    def record_failure(self, address: str) -> float | None:
        """Count a failed check from ``address``; seconds it is now blocked for, or None.

        Blocking (Redis), for a thread.
        """
        window = self.limits.window_seconds
        pipe = self.redis.pipeline(transaction=True)
        for key in (keys.auth_failures(address), keys.AUTH_FAILURES):
            pipe.set(key, 0, ex=window, nx=True)  # a new window starts with its expiry
            pipe.incr(key)
            pipe.ttl(key)
        _, address_count, address_ttl, _, total_count, total_ttl = pipe.execute()
        found = blocks_after_failure(
            self.limits, int(address_count), float(address_ttl), int(total_count), float(total_ttl)
        )
        now = self.clock()
        self._blocked_until = {who: t for who, t in self._blocked_until.items() if t > now}
        for who, seconds in found.items():
            blocked = address if who == "address" else who
            if blocked not in self._blocked_until:  # a block this process had not seen yet
                log.warning(
                    "too many wrong keys from %s: key checks answer 429 for %.0f s",
                    blocked or "all addresses",
                    seconds,
                    extra={"address": blocked or None, "blocked_seconds": round(seconds)},
                )
            self._blocked_until[blocked] = now + seconds
        return max(found.values()) if found else None


__all__ = ["FailureLimiter", "FailureLimits", "blocks_after_failure", "client_address"]
