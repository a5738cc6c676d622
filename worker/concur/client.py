"""The client for Concur's Notifications v4 API: builds each post, reads each answer.

``start`` hands posts to the process's one transport (``worker.concur.transport``, libcurl) and
returns at once, so a worker thread keeps every post of its batch in flight together; each post's
``Reply`` then gets an ``ApiResponse`` (any status) or a ``TransportFailure`` (timeout, refused
connection, broken protocol), never an exception, and ``outcomes.classify`` decides what either
means. The transport is injected, so tests can run the real client against
the loopback sandbox or a transport built with other limits.
"""

from __future__ import annotations

import email.utils
import functools
import json
import queue
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

from worker.concur.transport import Answer, CurlTransport, Exchange, ExchangeFailed
from worker.rules.outcomes import ApiResponse, TransportFailure
from worker.shapes.models import Message

CORRELATION_HEADER = "concur-correlationid"
USER_AGENT = "partner-notify/0.1"
MAX_KEPT_ERRORS = 10
MAX_ERROR_TEXT = 500


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP-date), else None."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    current = datetime.fromtimestamp(now if now is not None else time.time(), UTC)
    return max(0.0, (when - current).total_seconds())


def _clip(value: Any) -> str | None:
    if value is None:
        return None
    return str(value)[:MAX_ERROR_TEXT]


def parse_errors(content: bytes) -> list[dict[str, str | None]]:
    """The ``errors[]`` of the seed's ``ErrorMessage`` body; [] when absent or not JSON."""
    if not content:
        return []
    try:
        document = json.loads(content)
    except (ValueError, UnicodeDecodeError):
        return []
    items = document.get("errors") if isinstance(document, dict) else None
    if not isinstance(items, list):
        return []
    return [
        {
            "errorId": _clip(item.get("errorId")),
            "errorCode": _clip(item.get("errorCode")),
            "errorMessage": _clip(item.get("errorMessage")),
        }
        for item in items[:MAX_KEPT_ERRORS]
        if isinstance(item, dict)
    ]


Reply = Callable[[ApiResponse | TransportFailure], None]
"""Receives one post's result (on the transport's engine thread: keep it short)."""


def read_answer(result: Answer | ExchangeFailed) -> ApiResponse | TransportFailure:
    """What a transport result means to the decisions: an ``ApiResponse`` or why there was none."""
    if isinstance(result, ExchangeFailed):
        return TransportFailure(result.kind, result.detail, result.elapsed_seconds)
    success = 200 <= result.status < 300
    return ApiResponse(
        status=result.status,
        correlation_id=result.headers.get(CORRELATION_HEADER),
        errors=[] if success else parse_errors(result.body),
        retry_after_seconds=parse_retry_after(result.headers.get("retry-after")),
        elapsed_seconds=result.elapsed_seconds,
    )


def _reply(reply: Reply, result: Answer | ExchangeFailed) -> None:
    reply(read_answer(result))


class ConcurClient:
    """Posts messages to ``{base_url}/messages/{userId}/session`` with a bearer token; each post
    may name a base of its own (a registry company's geolocation)."""

    def __init__(
        self,
        base_url: str,
        *,
        connect_timeout_seconds: float = 5.0,
        timeout_seconds: float = 30.0,
        max_connections: int = 256,
        transport: CurlTransport | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.connect_timeout_seconds = connect_timeout_seconds
        self.timeout_seconds = timeout_seconds
        self._transport = transport or CurlTransport(max_connections)

    def message_url(self, user_id: str, base_url: str | None = None) -> str:
        """The v4 URL for one user; the id is one path segment, whatever it contains.

        ``base_url``: the company's geolocation's v4 base (None: the default company's).
        """
        base = self.base_url if base_url is None else base_url.rstrip("/")
        return f"{base}/messages/{quote(user_id, safe='')}/session"

    def start(
        self, posts: Iterable[tuple[Message, Reply]], token: str, base_url: str | None = None
    ) -> None:
        """Send each message without waiting; its ``Reply`` gets the answer (engine thread).

        ``base_url``: where these posts go (a company's geolocation, already trusted by the
        caller); None: the default company's base.
        """
        self._transport.submit(
            (self._exchange(message, token, base_url), functools.partial(_reply, reply))
            for message, reply in posts
        )

    def post_message(
        self, message: Message, token: str, base_url: str | None = None
    ) -> ApiResponse | TransportFailure:
        """Send one message and wait for the answer."""
        results: queue.SimpleQueue[ApiResponse | TransportFailure] = queue.SimpleQueue()
        self.start([(message, results.put)], token, base_url)
        return results.get()

    def _exchange(self, message: Message, token: str, base_url: str | None) -> Exchange:
        return Exchange(
            "POST",
            self.message_url(message.user_id, base_url),
            (
                "Accept: application/json",
                f"User-Agent: {USER_AGENT}",
                "Content-Type: application/json",
                f"Authorization: Bearer {token}",
            ),
            json.dumps(message.body(), separators=(",", ":")).encode(),
            # One deadline for the whole exchange: it bounds the attempt, so the in-flight
            # lease (settings.inflight_lease_seconds) always outlasts it.
            timeout_seconds=self.timeout_seconds,
            connect_timeout_seconds=self.connect_timeout_seconds,
        )

    def close(self) -> None:
        """Stop the transport (its connections close with it)."""
        self._transport.close()
