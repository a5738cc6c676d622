"""The per-process parts, built once from the settings: Redis, stores, HTTP client, policy.

Everything with I/O is made here and handed to the pure decisions, so tests can build a
``Runtime`` of their own with other settings or transports.
"""

from __future__ import annotations

import functools
import os
import socket
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from celery import Celery
from redis import Redis

from worker.concur.client import ConcurClient
from worker.concur.tokens import StaticToken, TokenProvider
from worker.concur.transport import CurlTransport
from worker.limits.breaker import Breaker, BreakerPolicy, Breakers
from worker.limits.inflight import InFlight
from worker.limits.ratelimit import RateLimiter, RateLimitPolicy
from worker.ops.tracing import publishing
from worker.queue.config import SEND_TASK, app_for
from worker.queue.envelopes import PUBLISHED_MS_HEADER, Envelope
from worker.queue.publisher import Publisher
from worker.rules.allowlist import AllowList
from worker.rules.retries import CompanyPolicy, RedisPatience, RetryPolicy
from worker.settings import Settings, SettingsError, get_settings
from worker.store import keys
from worker.store.codec import now_ms
from worker.store.deadletters import DeadLetterStore
from worker.store.history import settings_url
from worker.store.records import MessageStore, ReplicaWait
from worker.store.redisclient import make_redis

if TYPE_CHECKING:  # imported where used: the default company alone never loads them
    from worker.concur.companytokens import CompanyTokens
    from worker.store.companies import CompanyRegistry


def default_worker_name() -> str:
    """This process's name in records and liveness keys: ``host:pid``."""
    return f"{socket.gethostname()}:{os.getpid()}"


def make_allowlist(settings: Settings) -> AllowList:
    """The allow-list the settings describe; a bad entry is a settings error."""
    try:
        return AllowList.from_entries(settings.allowed_templates, settings.allowed_url_domains)
    except ValueError as error:
        raise SettingsError(f"NOTIFY_ALLOWED_URL_DOMAINS: {error}") from None


@dataclass
class Runtime:
    """One process's connections and policies."""

    settings: Settings
    redis: Redis
    allowlist: AllowList
    policy: RetryPolicy
    store: MessageStore
    transport: CurlTransport | None = None
    worker_name: str = field(default_factory=default_worker_name)
    _client: ConcurClient | None = None
    _tokens: TokenProvider | None = None
    _in_flight: InFlight | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        *,
        transport: CurlTransport | None = None,
        redis_patience: RedisPatience | None = None,
    ) -> Runtime:
        """Build every part from ``settings``.

        ``redis_patience``: how long Redis commands wait out an outage; by default the workers'
        and producers' (``NOTIFY_REDIS_PATIENCE_SECONDS``), ``retries.ANSWERING`` where someone
        waits for the answer.
        """
        worker_name = default_worker_name()
        redis = make_redis(
            settings,
            patience=redis_patience or RedisPatience.from_settings(settings),
            client_name=f"notify:{worker_name}",
        )
        store = MessageStore(
            redis,
            # A queued message not taken within this time is published again (the copy that
            # arrives second is fenced off), so it must outlast a normal queue wait.
            publish_grace_seconds=settings.visibility_timeout_seconds,
            lease_seconds=settings.inflight_lease_seconds,
            status_ttl_seconds=settings.status_ttl_seconds,
            replica_wait=ReplicaWait.from_settings(settings),
            history=settings.history_url is not None,
            history_url=settings_url(settings),
            laned=settings.dispatch == "fair",
            dispatch_grace_seconds=settings.dispatch_grace_seconds,
        )
        return cls(
            settings=settings,
            redis=redis,
            allowlist=make_allowlist(settings),
            policy=RetryPolicy.from_settings(settings),
            store=store,
            transport=transport,
            worker_name=worker_name,
        )

    @property
    def client(self) -> ConcurClient:
        """The process's one HTTP client, made on first use."""
        if self._client is None:
            with self._lock:
                if self._client is None:
                    s = self.settings
                    self._client = ConcurClient(
                        s.api_base_url,
                        connect_timeout_seconds=s.http_connect_timeout_seconds,
                        timeout_seconds=s.http_timeout_seconds,
                        max_connections=s.http_max_connections,
                        transport=self.transport,
                    )
        return self._client

    @property
    def tokens(self) -> TokenProvider:
        """The token provider, made on first use."""
        if self._tokens is None:
            with self._lock:
                if self._tokens is None:
                    self._tokens = self._make_tokens()
        return self._tokens

    def _make_tokens(self) -> TokenProvider:
        # OAuth client credentials alone name no default company (they connect the registry's):
        # the default company is then NOTIFY_API_TOKEN's, if any.
        if not self.settings.has_oauth_company:
            return StaticToken(self.settings)
        from worker.concur.oauth import OAuthTokens

        return OAuthTokens.from_settings(
            self.settings, self.redis, on_geolocation=self._follow_geolocation
        )

    def _follow_geolocation(self, geolocation: str) -> None:
        # Concur said where the company lives: posts go there from now on (one str assignment,
        # so threads posting meanwhile see the old or the new base, never a mix).
        from worker.concur.oauth import api_base_for

        self.client.base_url = api_base_for(geolocation, self.settings.api_base_url)

    @functools.cached_property
    def celery(self) -> Celery:
        """The Celery app that publishes for this runtime (the process's, if it is the same)."""
        return app_for(self.settings)

    def publish(self, envelopes: Sequence[Envelope]) -> None:
        """Queue send tasks for ``envelopes``; returns at once (``worker.queue.publisher``).

        Every message reaches the queue this way; ``publisher.flush()`` waits until it has.
        """
        self.publisher.submit(envelopes)

    @functools.cached_property
    def publisher(self) -> Publisher:
        """The process's one publisher: batches, retries while the broker is away."""
        return Publisher(self._send_task, self.settings.batch_size)

    def _send_task(self, batch: list[Envelope]) -> None:
        # One task for the batch the publisher made (up to NOTIFY_BATCH_SIZE messages): a
        # task's fixed cost in Celery (events, acknowledgement, tracing) is several times the
        # cost of a post, so messages published together travel together.
        # With tracing on, the task's headers carry the publish span's traceparent (None: off).
        with publishing(
            [envelope.trace for envelope in batch], self.settings.queue_name
        ) as headers:
            self.celery.send_task(
                SEND_TASK,
                args=[envelope.to_task() for envelope in batch],
                queue=self.settings.queue_name,
                # What Flower shows as the task's arguments: the message ids. Left to itself,
                # Celery builds a safe repr of every request body, which cost a producer a tenth
                # of its CPU (py-spy); the bodies are in Redis anyway.
                argsrepr=f"[{', '.join(envelope.id for envelope in batch)}]",
                kwargsrepr="{}",
                # When it was published: a dead worker's takeover reads it from the oldest task
                # on the queue (worker.delivery.mover.Liveness, kombu's window).
                headers={**(headers or {}), PUBLISHED_MS_HEADER: now_ms()},
            )

    @property
    def in_flight(self) -> InFlight:
        """The process's cap on posts in flight (``NOTIFY_MAX_IN_FLIGHT``), made on first use."""
        if self._in_flight is None:
            with self._lock:  # one per process: two would each count half the posts
                if self._in_flight is None:
                    self._in_flight = InFlight(self.settings.max_in_flight)
        return self._in_flight

    @functools.cached_property
    def rate_limiter(self) -> RateLimiter:
        """The global rate limit shared through Redis (free when the limit is off)."""
        # No I/O in the constructor, so two threads racing here at first use is harmless.
        return RateLimiter(self.redis, RateLimitPolicy.from_settings(self.settings))

    @functools.cached_property
    def breakers(self) -> Breakers:
        """The circuit breaker of each geolocation, shared through Redis."""
        return Breakers(
            self.redis,
            BreakerPolicy.from_settings(self.settings),
            # Where the default company's posts go now (an OAuth company may have moved): its
            # host[:port] names the geolocation.
            lambda: self.client.base_url,
        )

    @property
    def breaker(self) -> Breaker:
        """The default company's geolocation's circuit breaker (``notify:breaker``)."""
        return self.breakers.default

    @functools.cached_property
    def companies(self) -> CompanyRegistry:
        """The company registry over this runtime's Redis."""
        from worker.store.companies import CompanyRegistry

        return CompanyRegistry.from_settings(self.redis, self.settings)

    @functools.cached_property
    def company_tokens(self) -> CompanyTokens:
        """Registry companies' access tokens: at most NOTIFY_COMPANY_TOKEN_CACHE_SIZE kept."""
        from worker.concur.companytokens import CompanyTokens
        from worker.concur.oauth import OAuthConfig

        settings = self.settings
        return CompanyTokens(
            self.companies,
            OAuthConfig.from_settings(settings) if settings.uses_oauth else None,
            self.redis,
            capacity=settings.company_token_cache_size,
        )

    @functools.cached_property
    def company_policy(self) -> CompanyPolicy:
        """How long a company waiting to be reconnected keeps its messages."""
        return CompanyPolicy.from_settings(self.settings)

    def company_rate_limiter(self, company_id: str) -> RateLimiter | None:
        """A registry company's own pace (GCRA on its own key; a 429's penalty is the global
        one, since Concur's quota is the app's); None when the per-company limit is off."""
        per_second = self.settings.company_rate_limit_per_second
        if per_second <= 0:
            return None
        policy = RateLimitPolicy(per_second=per_second, burst=1)
        return RateLimiter(self.redis, policy, key=keys.company_ratelimit(company_id))

    @property
    def deadletters(self) -> DeadLetterStore:
        """The dead-letter store over this runtime's Redis."""
        return DeadLetterStore(self.redis, self.store, self.publish)

    def close(self) -> None:
        """Release connections."""
        if self._client is not None:
            self._client.close()
        if "company_tokens" in self.__dict__:
            self.company_tokens.close()
        self.redis.close()


@functools.cache
def get_runtime() -> Runtime:
    """The process's runtime, built on first use from the process settings."""
    return Runtime.from_settings(get_settings())


# A forked child must not share its parent's sockets.
os.register_at_fork(after_in_child=get_runtime.cache_clear)
