"""What a task's attempts use, and nothing more: the parts ``worker.runtime.Runtime`` wires.

A structural type, so the runtime (a lower layer, which must not import ``worker.delivery``)
satisfies it without knowing it, and a test can hand in parts of its own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from worker.concur.client import ConcurClient
from worker.concur.tokens import TokenProvider
from worker.limits.breaker import Breaker, Breakers
from worker.limits.inflight import InFlight
from worker.limits.ratelimit import RateLimiter
from worker.queue.publisher import Publisher
from worker.rules.allowlist import AllowList
from worker.rules.retries import CompanyPolicy, RetryPolicy
from worker.store import MessageStore

if TYPE_CHECKING:  # loaded only where a registry company is served (they bring the sealing)
    from worker.concur.companytokens import CompanyTokens
    from worker.store.companies import CompanyRegistry


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
        """The default company's access token."""
        ...

    @property
    def company_tokens(self) -> CompanyTokens:
        """Registry companies' access tokens (a bounded cache per process)."""
        ...

    @property
    def companies(self) -> CompanyRegistry:
        """The company registry: each registry company's state and geolocation."""
        ...

    @property
    def company_policy(self) -> CompanyPolicy:
        """How long a company waiting to be reconnected keeps its messages."""
        ...

    def company_rate_limiter(self, company_id: str) -> RateLimiter | None:
        """A registry company's own pace; None when NOTIFY_COMPANY_RATE_LIMIT_PER_SECOND is 0."""
        ...

    @property
    def breaker(self) -> Breaker:
        """The default company's geolocation's circuit breaker."""
        ...

    @property
    def breakers(self) -> Breakers:
        """The circuit breaker of each geolocation."""
        ...

    @property
    def in_flight(self) -> InFlight:
        """The process's cap on posts in flight: a batch takes its slots before its claims."""
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
