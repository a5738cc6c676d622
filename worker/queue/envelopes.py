"""The queue's wire format: what a ``send_message`` task carries, and reading it back.

A task's positional arguments are envelopes ``{"id", "gen", "req"}``: the message id, its
generation (``claim`` fences off older copies) and the v4 request; with tracing on, ``tp``: the
W3C traceparent of the request that queued it (``worker.ops.tracing``; a task carries messages
of many requests, so each carries its own). Producers, the mover and
replays write them (``Envelope.to_task``); a worker reads them with ``parse_task``, and anything
that is not an envelope becomes ``Malformed`` (a ``malformed_message`` dead letter, never an
error that loses the task). Each task also carries, in its headers, when it was published
(``PUBLISHED_MS_HEADER``): the takeover of a dead worker reads it from the oldest task still on the
queue to know which messages the queue has moved past (``published_ms_of``). Pure: no I/O.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from worker.shapes.models import (
    MAX_RAW_EXCERPT,
    TRACEPARENT_PATTERN,
    company_of,
    is_message_id,
    malformed_id,
    message_id,
    partner_of,
)

# A valid request is a few kilobytes at most (ids and a URL within models' limits); anything far
# larger is refused before it is stored anywhere.
MAX_REQUEST_BYTES = 16 * 1024

# The task header saying when the task was published (ms since the epoch, the records' clock).
PUBLISHED_MS_HEADER = "notify_published_ms"


@dataclass(frozen=True, slots=True)
class Envelope:
    """What a ``send_message`` task carries: the message id, its generation, the request."""

    id: str
    gen: int
    request: dict[str, Any]
    trace: str | None = None  # the producer's W3C traceparent, when tracing is on

    def to_task(self) -> dict[str, Any]:
        """The task argument."""
        if self.trace is None:
            return {"id": self.id, "gen": self.gen, "req": self.request}
        return {"id": self.id, "gen": self.gen, "req": self.request, "tp": self.trace}


@dataclass(frozen=True, slots=True)
class Malformed:
    """A task whose arguments cannot be read as an envelope."""

    id: str
    detail: str
    raw: str


def _malformed(raw_value: Any, detail: str) -> Malformed:
    try:
        raw = json.dumps(raw_value, default=repr, ensure_ascii=False)
    except (TypeError, ValueError):
        raw = repr(raw_value)
    raw = raw[:MAX_RAW_EXCERPT]
    return Malformed(malformed_id(raw), detail, raw)


def parse_envelope(value: Any) -> Envelope | Malformed:
    """Read one task argument ``{"id", "gen", "req"}``; anything else is ``Malformed``."""
    if not isinstance(value, dict):
        return _malformed(value, "an envelope must be an object with id, gen and req")
    request = value.get("req")
    if not isinstance(request, dict):
        return _malformed(value, "req is missing or not an object")
    if len(json.dumps(request, default=repr)) > MAX_REQUEST_BYTES:
        return _malformed(value, f"req is larger than {MAX_REQUEST_BYTES} bytes")
    if "id" not in value and "gen" not in value:
        # A hand-made task with only the request: give it the id a producer would have.
        parts = (request.get("userId"), request.get("sessionId"), request.get("templateId"))
        if not all(isinstance(part, str) for part in parts):
            return _malformed(value, "req lacks userId, sessionId or templateId")
        context = request.get("context")
        url = context.get("url") if isinstance(context, dict) else None
        made = message_id(
            *parts,  # type: ignore[arg-type]
            partner_of(request),
            company_of(request),
            url if isinstance(url, str) else None,
        )
        return Envelope(made, 1, request)
    ident, gen = value.get("id"), value.get("gen")
    if not isinstance(ident, str) or not is_message_id(ident):
        return _malformed(value, "id is not a short URL-safe string")
    if not isinstance(gen, int) or isinstance(gen, bool) or gen < 1:
        return _malformed(value, "gen is not a positive integer")
    trace = value.get("tp")
    # A traceparent is a hint for tracing, never a reason to refuse the message: one that is
    # not well formed is dropped.
    if trace is not None and not (isinstance(trace, str) and TRACEPARENT_PATTERN.fullmatch(trace)):
        trace = None
    return Envelope(ident, gen, request, trace)


def parse_task(args: tuple[Any, ...], kwargs: dict[str, Any]) -> list[Envelope | Malformed]:
    """Read a task's arguments: one envelope per positional argument, no keyword arguments."""
    if kwargs or not args:
        return [
            _malformed(
                {"args": args, "kwargs": kwargs},
                "expected one or more envelopes as positional arguments, and nothing else",
            )
        ]
    return [parse_envelope(value) for value in args]


def published_ms_of(raw: bytes | str) -> int | None:
    """When a task on the broker's Redis list was published, read from kombu's message as stored
    there (JSON, the task's headers in ``headers``); None for a task without the header (a
    hand-made one, or one published before it existed) or anything unreadable.
    """
    try:
        message = json.loads(raw)
    except (TypeError, ValueError, RecursionError):
        return None
    headers = message.get("headers") if isinstance(message, dict) else None
    value = headers.get(PUBLISHED_MS_HEADER) if isinstance(headers, dict) else None
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    return None
