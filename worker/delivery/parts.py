"""What a task's attempts use, and nothing more: the parts ``worker.runtime.Runtime`` wires.

A structural type, so the runtime (a lower layer, which must not import ``worker.delivery``)
satisfies it without knowing it, and a test can hand in parts of its own.
"""

from __future__ import annotations

from typing import Protocol

from worker.concur.client import ConcurClient
from worker.concur.tokens import TokenProvider
from worker.limits.breaker import Breaker
from worker.limits.ratelimit import RateLimiter
from worker.queue.publisher import Publisher
from worker.rules.allowlist import AllowList
from worker.rules.retries import RetryPolicy
from worker.store import MessageStore


class DeliveryParts(Protocol):
    """The store, the Concur client and tokens, the limits, the policies, the publisher."""

    @property
    def store(self) -> MessageStore:
        """The status records and the schedule: claims and every end are written there."""
        ...

    @property
    def client(self) -> ConcurClient:
        """The process's HTTP client to the API."""
        ...

    @property
    def tokens(self) -> TokenProvider:
        """The access token for the posts."""
        ...

    @property
    def breaker(self) -> Breaker:
        """The fleet-wide circuit breaker."""
        ...

    @property
    def rate_limiter(self) -> RateLimiter:
        """The fleet-wide pace of posts."""
        ...

    @property
    def policy(self) -> RetryPolicy:
        """When to try a message again, and when to give up."""
        ...

    @property
    def allowlist(self) -> AllowList:
        """The templates and link domains a message may use."""
        ...

    @property
    def publisher(self) -> Publisher:
        """The one way onto the queue (a task handed back at shutdown goes through it)."""
        ...

    @property
    def worker_name(self) -> str:
        """This process's name in records and dead letters."""
        ...
