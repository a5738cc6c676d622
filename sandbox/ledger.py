"""What the sandbox saw: the record of v4 requests and the counters behind ``/_sandbox/stats``.

A request is recorded (and counted) when its answer is decided, before any latency: a 200 the
client gave up waiting for still counts as delivered, as it would on the real API. A faulted
request (hung, dropped, garbled) is recorded with ``"status": null`` and counted apart from
``byStatus``. Connections are counted by the server layer as they open and close.

Each record says which company's token the request carried (its UUID; ``null`` for the default
company's tokens, an unknown token or none) and which geolocation received it; the counters are
kept per (company, geolocation) too, so ``/_sandbox/stats`` can answer for one company, one
geolocation or both, however old the records are.

:class:`Ledger` is not thread-safe: the sandbox calls it under its own lock.
"""

from __future__ import annotations

import contextlib
import json
from collections import deque
from dataclasses import dataclass
from typing import Any

from sandbox.companies import DEFAULT_COMPANY
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
    company: str | None
    geolocation: str

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
            "company": self.company,
            "geolocation": self.geolocation,
        }


class _Counts:
    """The counters of ``/_sandbox/stats`` over some of the requests."""

    __slots__ = (
        "by_status",
        "delivered",
        "faults",
        "first_delivered_at",
        "last_delivered_at",
        "max_per_second",
        "per_second",
        "total",
    )

    def __init__(self) -> None:
        self.total = 0
        self.by_status: dict[int, int] = {}
        self.delivered = 0
        self.first_delivered_at: float | None = None
        self.last_delivered_at: float | None = None
        self.per_second: dict[int, int] = {}
        self.max_per_second = 0
        self.faults = {"hang": 0, "drop": 0, "garbled": 0}

    def count(self, at: float, status: int, fault: str | None) -> None:
        self.total += 1
        if fault is not None:
            self.faults[fault] += 1
            return
        self.by_status[status] = self.by_status.get(status, 0) + 1
        if 200 <= status < 300:
            self.delivered += 1
            if self.first_delivered_at is None:
                self.first_delivered_at = at
            self.last_delivered_at = at
            second = int(at)
            count = self.per_second.get(second, 0) + 1
            self.per_second[second] = count
            if count > self.max_per_second:
                self.max_per_second = count

    def add(self, other: _Counts) -> None:
        """Add another's counts to these (the per-second peak is taken again)."""
        self.total += other.total
        self.delivered += other.delivered
        for status, n in other.by_status.items():
            self.by_status[status] = self.by_status.get(status, 0) + n
        for fault, n in other.faults.items():
            self.faults[fault] += n
        for second, n in other.per_second.items():
            self.per_second[second] = self.per_second.get(second, 0) + n
        self.max_per_second = max(self.per_second.values(), default=0)
        firsts = [t for t in (self.first_delivered_at, other.first_delivered_at) if t is not None]
        lasts = [t for t in (self.last_delivered_at, other.last_delivered_at) if t is not None]
        self.first_delivered_at = min(firsts, default=None)
        self.last_delivered_at = max(lasts, default=None)

    def to_json(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "byStatus": {str(k): v for k, v in sorted(self.by_status.items())},
            "delivered": self.delivered,
            # When the first and the latest 2xx were decided (epoch seconds): rates taken
            # between them leave out the clients' start-up.
            "firstDeliveredAt": self.first_delivered_at,
            "lastDeliveredAt": self.last_delivered_at,
            "perSecond": {str(k): v for k, v in sorted(self.per_second.items())},
            "maxPerSecond": self.max_per_second,
            "hung": self.faults["hang"],
            "dropped": self.faults["drop"],
            "garbled": self.faults["garbled"],
        }


def _matches(value: str | None, wanted: str | None) -> bool:
    """A record's company against a filter (``default`` is the records with none)."""
    return wanted is None or value == (None if wanted == DEFAULT_COMPANY else wanted)


class Ledger:
    """The last ``max_records`` v4 requests, and counters over all of them since the reset."""

    def __init__(self, max_records: int) -> None:
        self._records: deque[Record] = deque(maxlen=max_records)
        self._sha_cache: dict[str, str] = {}
        self._conn_seq = 0
        self._open_connections: dict[str, int] = {}  # per geolocation
        self.reset()

    def reset(self) -> None:
        """Forget the records and counters (open connections stay open, so stay counted)."""
        self._records.clear()
        self._seq = 0
        self._all = _Counts()
        self._by_key: dict[tuple[str | None, str], _Counts] = {}
        self._connections: dict[str, int] = {}  # per geolocation

    def connection_opened(self, geolocation: str) -> int:
        """Count a new connection to a geolocation; its id, for the records of its requests."""
        self._conn_seq += 1
        self._connections[geolocation] = self._connections.get(geolocation, 0) + 1
        self._open_connections[geolocation] = self._open_connections.get(geolocation, 0) + 1
        return self._conn_seq

    def connection_closed(self, geolocation: str) -> None:
        self._open_connections[geolocation] -= 1

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
        company: str | None,
        geolocation: str,
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
        self._all.count(at, status, fault)
        key = (company, geolocation)
        counts = self._by_key.get(key)
        if counts is None:
            counts = self._by_key[key] = _Counts()
        counts.count(at, status, fault)
        self._records.append(
            Record(
                self._seq,
                at,
                method,
                path,
                user_id,
                template_id,
                body,
                None if fault is not None else status,
                correlation_id,
                authorized,
                sha,
                connection,
                company,
                geolocation,
            )
        )

    def requests(
        self,
        user_id: str | None,
        template_id: str | None,
        company: str | None = None,
        geolocation: str | None = None,
    ) -> list[Record]:
        """The records matching every filter (None matches all), oldest first."""
        return [
            r
            for r in self._records
            if (user_id is None or r.user_id == user_id)
            and (template_id is None or r.template_id == template_id)
            and _matches(r.company, company)
            and (geolocation is None or r.geolocation == geolocation)
        ]

    def stats(self, company: str | None = None, geolocation: str | None = None) -> dict[str, Any]:
        """The ``/_sandbox/stats`` document, over one company's and/or one geolocation's
        requests when asked (``connections`` then count the geolocation's, or all)."""
        if company is None and geolocation is None:
            counts = self._all
        else:
            counts = _Counts()
            for (key_company, key_geolocation), some in self._by_key.items():
                if _matches(key_company, company) and geolocation in (None, key_geolocation):
                    counts.add(some)
        doc = counts.to_json()
        if geolocation is None:
            doc["connections"] = sum(self._connections.values())
            doc["openConnections"] = sum(self._open_connections.values())
        else:
            doc["connections"] = self._connections.get(geolocation, 0)
            doc["openConnections"] = self._open_connections.get(geolocation, 0)
        return doc

    def by_company(self) -> dict[str | None, tuple[int, int]]:
        """Requests and 2xx per company (None: the default), over every geolocation."""
        totals: dict[str | None, tuple[int, int]] = {}
        for (company, _), counts in self._by_key.items():
            total, delivered = totals.get(company, (0, 0))
            totals[company] = (total + counts.total, delivered + counts.delivered)
        return totals
