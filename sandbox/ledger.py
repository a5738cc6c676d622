"""What the sandbox saw: the record of v4 requests and the counters behind ``/_sandbox/stats``.

A request is recorded (and counted) when its answer is decided, before any latency: a 200 the
client gave up waiting for still counts as delivered, as it would on the real API. A faulted
request (hung, dropped, garbled) is recorded with ``"status": null`` and counted apart from
``byStatus``. Connections are counted by the server layer as they open and close.

:class:`Ledger` is not thread-safe: the sandbox calls it under its own lock.
"""

from __future__ import annotations

import contextlib
import json
from collections import deque
from dataclasses import dataclass
from typing import Any

from sandbox.v4 import token_sha

__all__ = ["Ledger"]

_SHA_CACHE_SIZE = 1024


@dataclass(slots=True)
class Record:
    """One v4 request as the sandbox decided it (``status`` None: a fault answered it)."""

    # Slotted and holding the raw body: 200k of these must stay small in a long benchmark.
    seq: int
    at: float
    method: str
    path: str
    user_id: str | None
    template_id: str | None
    body: bytes
    status: int | None
    correlation_id: str
    authorized: bool
    token_sha: str | None
    connection: int

    def to_json(self) -> dict[str, Any]:
        parsed: Any = None
        if self.body:
            with contextlib.suppress(ValueError, RecursionError):
                parsed = json.loads(self.body)
        return {
            "seq": self.seq,
            "at": self.at,
            "method": self.method,
            "path": self.path,
            "userId": self.user_id,
            "templateId": self.template_id,
            "body": parsed,
            "status": self.status,
            "correlationId": self.correlation_id,
            "authorized": self.authorized,
            "tokenSha256": self.token_sha,
            "connection": self.connection,
        }


class Ledger:
    """The last ``max_records`` v4 requests, and counters over all of them since the reset."""

    def __init__(self, max_records: int) -> None:
        self._records: deque[Record] = deque(maxlen=max_records)
        self._sha_cache: dict[str, str] = {}
        self._conn_seq = 0
        self._open_connections = 0
        self.reset()

    def reset(self) -> None:
        """Forget the records and counters (open connections stay open, so stay counted)."""
        self._records.clear()
        self._seq = 0
        self._total = 0
        self._by_status: dict[int, int] = {}
        self._delivered = 0
        self._first_delivered_at: float | None = None
        self._last_delivered_at: float | None = None
        self._per_second: dict[int, int] = {}
        self._max_per_second = 0
        self._faults = {"hang": 0, "drop": 0, "garbled": 0}
        self._connections = 0

    def connection_opened(self) -> int:
        """Count a new connection; its id, for the records of its requests."""
        self._conn_seq += 1
        self._connections += 1
        self._open_connections += 1
        return self._conn_seq

    def connection_closed(self) -> None:
        self._open_connections -= 1

    def record(
        self,
        *,
        at: float,
        connection: int,
        method: str,
        path: str,
        user_id: str | None,
        template_id: str | None,
        body: bytes,
        status: int,
        fault: str | None,
        correlation_id: str,
        authorized: bool,
        token: str | None,
    ) -> None:
        """Record one decided answer and count it (``fault`` set: counted apart, no status)."""
        sha: str | None = None
        if token is not None:
            sha = self._sha_cache.get(token)
            if sha is None:
                sha = token_sha(token)
                # Bounded so a client spraying random tokens cannot grow it forever.
                if len(self._sha_cache) < _SHA_CACHE_SIZE:
                    self._sha_cache[token] = sha
        self._seq += 1
        self._total += 1
        recorded: int | None = None
        if fault is not None:
            self._faults[fault] += 1
        else:
            recorded = status
            self._by_status[status] = self._by_status.get(status, 0) + 1
            if 200 <= status < 300:
                self._delivered += 1
                if self._first_delivered_at is None:
                    self._first_delivered_at = at
                self._last_delivered_at = at
                second = int(at)
                count = self._per_second.get(second, 0) + 1
                self._per_second[second] = count
                if count > self._max_per_second:
                    self._max_per_second = count
        self._records.append(
            Record(
                self._seq,
                at,
                method,
                path,
                user_id,
                template_id,
                body,
                recorded,
                correlation_id,
                authorized,
                sha,
                connection,
            )
        )

    def requests(self, user_id: str | None, template_id: str | None) -> list[Record]:
        """The records matching both filters (None matches all), oldest first."""
        return [
            r
            for r in self._records
            if (user_id is None or r.user_id == user_id)
            and (template_id is None or r.template_id == template_id)
        ]

    def stats(self) -> dict[str, Any]:
        """The ``/_sandbox/stats`` document."""
        return {
            "total": self._total,
            "byStatus": {str(k): v for k, v in sorted(self._by_status.items())},
            "delivered": self._delivered,
            # When the first and the latest 2xx were decided (epoch seconds): rates taken
            # between them leave out the clients' start-up.
            "firstDeliveredAt": self._first_delivered_at,
            "lastDeliveredAt": self._last_delivered_at,
            "perSecond": {str(k): v for k, v in sorted(self._per_second.items())},
            "maxPerSecond": self._max_per_second,
            "hung": self._faults["hang"],
            "dropped": self._faults["drop"],
            "garbled": self._faults["garbled"],
            "connections": self._connections,
            "openConnections": self._open_connections,
        }
