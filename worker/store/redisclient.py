"""Redis clients: one rule for waiting out an outage, and following a Sentinel failover.

Every Redis client of the project is made by ``make_redis``. Its commands wait out a Redis outage
by one policy (``worker.rules.retries.RedisPatience``), handed to redis-py as the client's retry: a
command that meets a dropped connection, a refused one or a timeout is tried again on a new
connection, pausing 50 ms doubling to 1 s, until the patience is spent. redis-py's own ``Retry``
counts tries; this one counts time, since a try may fail in a millisecond (refused) or after the
connect timeout (an unreachable host), and a count would stretch the wait from seconds to
minutes. Nothing above the client loops on Redis errors again, so no two waits multiply.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar

from redis import Redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from worker.rules.retries import RedisPatience
from worker.settings import Settings

T = TypeVar("T")


class PatientRetry(Retry):
    """redis-py's retry, bounded by the time ``patience`` allows rather than by a count."""

    def __init__(self, patience: RedisPatience) -> None:
        super().__init__(NoBackoff(), retries=-1)
        self.patience = patience

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PatientRetry) and other.patience == self.patience

    __hash__ = Retry.__hash__

    def call_with_retry(
        self,
        do: Callable[[], T],
        fail: Callable[..., Any],
        is_retryable: Callable[[Exception], bool] | None = None,
        with_failure_count: bool = False,
    ) -> T:
        """Run ``do``; on a connection error or timeout, ``fail`` (redis-py disconnects), pause,
        and try again, while the patience lasts."""
        started = time.monotonic()
        failures = 0
        while True:
            try:
                return do()
            except self._supported_errors as error:
                if is_retryable is not None and not is_retryable(error):
                    raise
                failures += 1
                if with_failure_count:
                    fail(error, failures)
                else:
                    fail(error)
                if not self.patience.may_try_again(time.monotonic() - started, failures):
                    raise
                time.sleep(self.patience.pause_seconds(failures))


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


def make_redis(
    settings: Settings | str, *, patience: RedisPatience, client_name: str | None = None
) -> Redis:
    """A Redis client (a connection pool) with text replies, waiting out outages by ``patience``.

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
        "retry": PatientRetry(patience),
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
    sentinel = Sentinel(  # type: ignore[no-untyped-call,unused-ignore]
        settings.sentinel_addresses,
        sentinel_kwargs={
            "password": secret.get_secret_value() if secret else None,
            "socket_connect_timeout": 2,
            "socket_timeout": 2,
        },
    )
    assert settings.redis_sentinel_master is not None  # checked with the settings
    client: Redis = sentinel.master_for(  # type: ignore[no-untyped-call,unused-ignore]
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
