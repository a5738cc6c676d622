"""The Redis broker transport: kombu's, with channels that survive their connection's close.

When Redis restarts, Celery (5.7) detaches the broken connection's transport from its client
before it has finished with the connection's channels: restoring unacknowledged messages on
close, and acknowledging tasks that finish during the reconnect, then read the client's host and
port from ``None`` and raise an AttributeError that nothing expects, and the worker exits
("Unrecoverable error") instead of reconnecting. These channels remember the client they were
opened with, so such late calls reach the same Redis (and an acknowledgement made after the
reconnect still removes the message from kombu's ``unacked`` hash, sparing a redelivery).

They also reuse one ``redis.Redis`` client over their connection pool. kombu builds a new one
for every acknowledgement, event and publish, and a redis-py client's constructor (its table of
response callbacks) was the largest single cost of a worker's event loop (py-spy); a client is
only a handle on the pool and is safe to share between threads.
"""

from __future__ import annotations

from typing import Any

from kombu.transport import redis as kombu_redis


class _Detached:
    """A stand-in for a transport whose client was taken away: the remembered client."""

    def __init__(self, transport: Any, client: Any) -> None:
        self.client = client
        self.default_port = transport.default_port


class Channel(kombu_redis.Channel):
    """kombu's Redis channel, remembering the connection details it was opened with."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._opened_with = args[0].client if args else None
        self._shared_client: Any = None
        super().__init__(*args, **kwargs)  # type: ignore[no-untyped-call]

    def _create_client(self, asynchronous: bool = False) -> Any:
        if asynchronous:
            return super()._create_client(asynchronous=True)  # type: ignore[no-untyped-call]
        client = self._shared_client
        # A reconnect replaces the pool; a client of the old one must not outlive it.
        if client is None or client.connection_pool is not self.pool:
            client = super()._create_client()  # type: ignore[no-untyped-call]
            self._shared_client = client
        return client

    def _connparams(self, asynchronous: bool = False) -> dict[str, Any]:
        transport = self.connection
        if transport is None or transport.client is not None or self._opened_with is None:
            return dict(super()._connparams(asynchronous))  # type: ignore[no-untyped-call]
        # Read the details through a stand-in rather than reattaching the client to the
        # transport, which Celery is tearing down.
        self.connection = _Detached(transport, self._opened_with)
        try:
            return dict(super()._connparams(asynchronous))  # type: ignore[no-untyped-call]
        finally:
            self.connection = transport


class Transport(kombu_redis.Transport):
    """kombu's Redis transport with the channel above (``broker_transport``)."""

    Channel = Channel


class SentinelChannel(Channel, kombu_redis.SentinelChannel):
    """kombu's Sentinel channel (the master found through the sentinels) with the fixes above.

    Its pool is built from the connection's list of sentinel URLs, read from the same detached
    client: after a failover, an acknowledgement made during the reconnect otherwise ended the
    worker with "Unrecoverable error: AttributeError ... no attribute 'alt'" (measured).
    """

    def _sentinel_managed_pool(self, asynchronous: bool = False) -> Any:
        transport = self.connection
        if transport is None or transport.client is not None or self._opened_with is None:
            return super()._sentinel_managed_pool(asynchronous)  # type: ignore[no-untyped-call]
        self.connection = _Detached(transport, self._opened_with)
        try:
            return super()._sentinel_managed_pool(asynchronous)  # type: ignore[no-untyped-call]
        finally:
            self.connection = transport


class SentinelTransport(kombu_redis.SentinelTransport):
    """kombu's ``sentinel://`` transport with the channel above (``NOTIFY_REDIS_SENTINELS``)."""

    Channel = SentinelChannel
