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
from typing import Any

from celery import Celery
from redis import Redis

from worker.allowlist import AllowList
from worker.breaker import Breaker, BreakerPolicy
from worker.celeryconfig import SEND_TASK, app_for
from worker.concur import ConcurClient
from worker.deadletters import DeadLetterStore
from worker.publisher import Publisher
from worker.ratelimit import RateLimiter, RateLimitPolicy
from worker.records import Envelope, MessageStore
from worker.retries import RetryPolicy
from worker.settings import Settings, SettingsError, get_settings
from worker.tokens import StaticToken, TokenProvider
from worker.transport import CurlTransport


def default_worker_name() -> str:
    """This process's name in records and liveness keys: ``host:pid``."""
    return f"{socket.gethostname()}:{os.getpid()}"


class _FollowMaster:
    """Reconnects to wherever the sentinels say the master is now, whichever path reconnects.

    redis-py (8.1) resolves the master in ``SentinelManagedConnection.connect``, but a command
    sent on a dropped connection reconnects through ``connect_check_health`` with the address
    it had: a pooled connection is connected again by the pool first, but the per-thread
    single-connection clients of ``MessageStore`` kept dialling the dead master after a
    failover (measured: ``Connection refused`` for as long as we watched, while the pool had
    moved on). Here that path asks the sentinels too.
    """

    _sock: Any

    def connect_check_health(
        self, check_health: bool = True, retry_socket_connect: bool = True
    ) -> None:
        if self._sock is None and retry_socket_connect:
            # ``connect`` resolves the master, then calls back here with retry off.
            self.connect()  # type: ignore[attr-defined]
            return
        super().connect_check_health(  # type: ignore[misc]
            check_health=check_health, retry_socket_connect=retry_socket_connect
        )


def make_redis(settings: Settings | str, *, client_name: str | None = None) -> Redis:
    """A Redis client (a connection pool) with text replies and bounded waits.

    Given settings that name sentinels (``NOTIFY_REDIS_SENTINELS``), the client is redis-py's
    ``Sentinel.master_for``: each new connection asks the sentinels where the master is, and a
    connection that meets a demoted master (``READONLY``) or a dead one is dropped, so the next
    command (redis-py retries it) reaches the new master. ``NOTIFY_REDIS_URL`` then gives only the
    database number and the password. ``client_name`` names every connection (``CLIENT LIST``
    shows whose they are; the mover's liveness check reads it).
    """
    options: dict[str, Any] = {
        "decode_responses": True,
        "socket_connect_timeout": 5,
        "socket_timeout": 30,
        "health_check_interval": 30,
        "retry_on_timeout": True,
    }
    if client_name:
        options["client_name"] = client_name
    if isinstance(settings, str):
        return Redis.from_url(settings, **options)
    if not settings.uses_sentinel:
        return Redis.from_url(settings.redis_url, **options)
    from urllib.parse import urlsplit

    from redis.sentinel import (
        Sentinel,
        SentinelManagedConnection,
        SentinelManagedSSLConnection,
    )

    class FollowingConnection(_FollowMaster, SentinelManagedConnection):
        pass

    class FollowingSSLConnection(_FollowMaster, SentinelManagedSSLConnection):
        pass

    parts = urlsplit(settings.redis_url)
    secret = settings.redis_sentinel_password
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        settings.sentinel_addresses,
        sentinel_kwargs={
            "password": secret.get_secret_value() if secret else None,
            "socket_connect_timeout": 2,
            "socket_timeout": 2,
        },
    )
    assert settings.redis_sentinel_master is not None  # checked with the settings
    client: Redis = sentinel.master_for(  # type: ignore[no-untyped-call]
        settings.redis_sentinel_master,
        redis_class=Redis,
        db=int(parts.path.lstrip("/") or 0),
        username=parts.username,
        password=parts.password,
        ssl=parts.scheme == "rediss",
        connection_class=FollowingSSLConnection
        if parts.scheme == "rediss"
        else FollowingConnection,
        **options,
    )
    return client


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
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def from_settings(
        cls, settings: Settings, *, transport: CurlTransport | None = None
    ) -> Runtime:
        """Build every part from ``settings``."""
        worker_name = default_worker_name()
        redis = make_redis(settings, client_name=f"notify:{worker_name}")
        store = MessageStore(
            redis,
            # A queued message not taken within this time is published again (the copy that
            # arrives second is fenced off), so it must outlast a normal queue wait.
            publish_grace_seconds=settings.visibility_timeout_seconds,
            lease_seconds=settings.inflight_lease_seconds,
            status_ttl_seconds=settings.status_ttl_seconds,
            wait_replicas=settings.wait_replicas,
            history=settings.history_url is not None,
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
        if not self.settings.uses_oauth:
            return StaticToken(self.settings)
        from worker.oauth import OAuthTokens

        return OAuthTokens.from_settings(
            self.settings, self.redis, on_geolocation=self._follow_geolocation
        )

    def _follow_geolocation(self, geolocation: str) -> None:
        # Concur said where the company lives: posts go there from now on (one str assignment,
        # so threads posting meanwhile see the old or the new base, never a mix).
        from worker.oauth import api_base_for

        self.client.base_url = api_base_for(geolocation, self.settings.api_base_url)

    @functools.cached_property
    def celery(self) -> Celery:
        """The Celery app that publishes for this runtime (the process's, if it is the same)."""
        return app_for(self.settings)

    def publish(self, envelopes: Sequence[Envelope]) -> None:
        """Queue send tasks for ``envelopes``; returns at once (``worker.publisher``).

        Every message reaches the queue this way; ``publisher.flush()`` waits until it has.
        """
        self.publisher.submit(envelopes)

    @functools.cached_property
    def publisher(self) -> Publisher:
        """The process's one publisher: batches, retries while the broker is away."""
        return Publisher(self._send_tasks, self.settings.batch_size)

    def _send_tasks(self, envelopes: list[Envelope]) -> None:
        # Up to NOTIFY_BATCH_SIZE messages per task: a task's fixed cost in Celery (events,
        # acknowledgement, tracing) is several times the cost of a post, so messages published
        # together travel together; one broker connection publishes them all.
        size = self.settings.batch_size
        app = self.celery
        with app.producer_or_acquire() as producer:
            for start in range(0, len(envelopes), size):
                batch = envelopes[start : start + size]
                app.send_task(
                    SEND_TASK,
                    args=[envelope.to_task() for envelope in batch],
                    queue=self.settings.queue_name,
                    producer=producer,
                    # What Flower shows as the task's arguments: the message ids. Left to
                    # itself, Celery builds a safe repr of every request body, which cost a
                    # producer a tenth of its CPU (py-spy); the bodies are in Redis anyway.
                    argsrepr=f"[{', '.join(envelope.id for envelope in batch)}]",
                    kwargsrepr="{}",
                )

    @functools.cached_property
    def rate_limiter(self) -> RateLimiter:
        """The global rate limit shared through Redis (free when the limit is off)."""
        # No I/O in the constructor, so two threads racing here at first use is harmless.
        return RateLimiter(self.redis, RateLimitPolicy.from_settings(self.settings))

    @functools.cached_property
    def breaker(self) -> Breaker:
        """The fleet-wide circuit breaker, shared through Redis."""
        return Breaker(self.redis, BreakerPolicy.from_settings(self.settings))

    @property
    def deadletters(self) -> DeadLetterStore:
        """The dead-letter store over this runtime's Redis."""
        return DeadLetterStore(self.redis, self.store, self.publish)

    def close(self) -> None:
        """Release connections."""
        if self._client is not None:
            self._client.close()
        self.redis.close()


@functools.cache
def get_runtime() -> Runtime:
    """The process's runtime, built on first use from the process settings."""
    return Runtime.from_settings(get_settings())


# A forked child must not share its parent's sockets.
os.register_at_fork(after_in_child=get_runtime.cache_clear)
