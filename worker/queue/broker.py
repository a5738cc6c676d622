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

And they let the worker note what it received in the same step as kombu does: kombu moves a
task it hands to the worker into its ``unacked`` hash (``QoS.append``), where it stays until
acknowledged or, for a worker that died, until the visibility timeout (an hour by default).
The worker also notes the task's messages as its own (``keys.held``, worker.delivery.mover) so
that a live worker takes them over seconds after it dies. Noted later, from Celery's
``task_received`` signal, a SIGKILL in between left a received task in ``unacked`` and in no
worker's held set: measured, one batch of 20 in each of three runs, waiting out the grace
period. ``on_receipt`` sets a hook that adds its commands to the pipeline that writes
``unacked``, so the two happen together (a ``MULTI``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from kombu.utils.json import dumps

# Called with the pipeline that writes a received task into ``unacked``, and the task's kombu
# message; it adds its own commands (worker.celery_app notes the messages held).
ReceiptHook = Callable[[Any, Any], None]
_on_receipt: ReceiptHook | None = None


def on_receipt(hook: ReceiptHook | None) -> None:
    """Set (or, with None, remove) this process's hook on every task it receives."""
    global _on_receipt
    _on_receipt = hook


def receipt_hook() -> ReceiptHook | None:
    """The hook set by ``on_receipt``, if any."""
    return _on_receipt


class QoS(kombu_redis.QoS):
    """kombu's record of unacknowledged tasks, with the receipt hook in the same pipeline."""

    def append(self, message: Any, delivery_tag: Any) -> None:
        """Note a received task as unacknowledged (and run the hook in the same ``MULTI``)."""
        hook = _on_receipt
        if hook is None:
            super().append(message, delivery_tag)  # type: ignore[no-untyped-call]
            return
        delivery = message.delivery_info
        # kombu 5's own commands (kombu.transport.redis.QoS.append), plus the hook's.
        entry = [message._raw, delivery["exchange"], delivery["routing_key"]]
        raw = dumps(entry)  # type: ignore[no-untyped-call]
        with self.pipe_or_acquire() as pipe:
            pipe.zadd(self.unacked_index_key, {delivery_tag: time.time()})
            pipe.hset(self.unacked_key, delivery_tag, raw)
            hook(pipe, message)
            pipe.execute()
        # The in-process bookkeeping kombu's QoS does after its pipeline.
        virtual.QoS.append(self, message, delivery_tag)  # type: ignore[no-untyped-call]


class _Detached:
    """A stand-in for a transport whose client was taken away: the remembered client."""

    def __init__(self, transport: Any, client: Any) -> None:
        self.client = client
        self.default_port = transport.default_port


class Channel(kombu_redis.Channel):
    """kombu's Redis channel, remembering the connection details it was opened with."""

    QoS = QoS

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
