"""How ``notify api`` serves HTTP: uvicorn with httptools, bounded against slow and greedy clients.

uvicorn bounds the idle time between requests (``timeout_keep_alive``) and, with
``limit_concurrency``, answers 503 over a count of connections or tasks; it has no deadline for
a request's head or body (uvicorn issue #157: a client sending a header line every few seconds,
or a body a byte at a time, holds its connection for ever), and its httptools protocol does not
bound the head's size (an 8 MiB header was accepted). ``BoundedHttpToolsProtocol`` is uvicorn's
own httptools protocol, passed to it as ``http=``, with what is missing:

* the head must be complete within ``header_timeout_seconds``: from the connection for its first
  request, from the first byte of each later one (between requests uvicorn's keep-alive limit
  applies); a client that sent part of a head is answered 408, a silent one just closed;
* the head may hold at most ``max_header_bytes`` (request line and headers): 431 and closed,
  counted as it arrives, so no more than the limit and one read is ever buffered;
* the body must be complete within ``body_timeout_seconds`` of the head: 408 and closed (the
  app, waiting for the body, sees the client leave);
* past ``max_connections`` open connections in this process a new one is answered 503 and
  closed at once.

Each answer is written by the protocol itself, before any app runs, with ``Connection: close``.
"""

from __future__ import annotations

import asyncio
import functools
import http
from dataclasses import dataclass
from typing import Any

from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from worker.settings import Settings


@dataclass(frozen=True, slots=True)
class HttpLimits:
    """The HTTP service's bounds on each client (``NOTIFY_SERVICE_*``), per process."""

    header_timeout_seconds: float
    body_timeout_seconds: float
    keep_alive_seconds: int
    max_header_bytes: int
    max_connections: int

    @classmethod
    def from_settings(cls, settings: Settings) -> HttpLimits:
        """Read the limits from the settings."""
        return cls(
            header_timeout_seconds=settings.service_header_timeout_seconds,
            body_timeout_seconds=settings.service_body_timeout_seconds,
            keep_alive_seconds=settings.service_keep_alive_seconds,
            max_header_bytes=settings.service_max_header_bytes,
            max_connections=settings.service_max_connections,
        )


def refusal(status: int, text: str) -> bytes:
    """A complete ``Connection: close`` answer with a plain-text body, as written on the wire."""
    body = (text + "\n").encode("ascii")
    phrase = http.HTTPStatus(status).phrase
    return (
        f"HTTP/1.1 {status} {phrase}\r\n"
        "content-type: text/plain; charset=utf-8\r\n"
        f"content-length: {len(body)}\r\n"
        "connection: close\r\n\r\n"
    ).encode("ascii") + body


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with head and body deadlines, a head size bound and a cap
    on connections (see the module's docstring)."""

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
        *,
        limits: HttpLimits,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.limits = limits
        self._deadline: asyncio.TimerHandle | None = None
        # Bytes of a head that is not complete yet; None while a body (or nothing) is awaited
        # after a complete head.
        self._head_bytes: int | None = 0
        self._refused = False

    # the deadline timer

    def _arm(self, seconds: float) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(seconds, self._deadline_passed)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _deadline_passed(self) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        if self._head_bytes == 0:
            self.transport.close()  # nothing of a request came: nobody to answer
        elif self._head_bytes is not None:
            self._refuse(408, "The request head did not arrive in time.")
        elif self.cycle is not None and not self.cycle.response_started:
            self._refuse(408, "The request body did not arrive in time.")
        else:
            self.transport.close()

    def _refuse(self, status: int, text: str) -> None:
        self._refused = True
        self._disarm()
        if not self.transport.is_closing():
            self.transport.write(refusal(status, text))
            self.transport.close()

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        """Count the connection; refuse it over the cap; start the first head's deadline."""
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            self._refuse(503, "Too many connections; try again later.")
            return
        self._arm(self.limits.header_timeout_seconds)

    def connection_lost(self, exc: Exception | None) -> None:
        """Stop the deadline with the connection."""
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        """Count the bytes of an incomplete head; refuse the head once it is too large."""
        if self._refused:
            return
        if self._head_bytes is not None:
            self._head_bytes += len(data)
        super().data_received(data)
        if (
            self._head_bytes is not None
            and self._head_bytes > self.limits.max_header_bytes
            and not self._refused
        ):
            self._refuse(431, "The request head is too large.")

    # httptools parser callbacks

    def on_message_begin(self) -> None:
        """A request starts: its head's deadline runs from here (unless it already does)."""
        super().on_message_begin()
        if self._refused:
            return
        if self._head_bytes is None:
            self._head_bytes = 0
        if self._deadline is None:
            self._arm(self.limits.header_timeout_seconds)

    def on_headers_complete(self) -> None:
        """The head is in: check its size, then give the body its deadline."""
        if self._refused:
            return
        self._head_bytes = None
        size = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
        if size > self.limits.max_header_bytes:
            self._refuse(431, "The request head is too large.")
            return
        self._arm(self.limits.body_timeout_seconds)
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        """Hand the body on, unless the request was refused."""
        if not self._refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        """The request is in: no deadline while the app answers; the next head starts fresh."""
        if self._refused:
            return
        self._disarm()
        self._head_bytes = 0
        super().on_message_complete()

    def handle_websocket_upgrade(self) -> None:
        """The connection leaves HTTP (and this protocol): no body deadline for it."""
        self._disarm()
        super().handle_websocket_upgrade()

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a malformed request, unless this one was refused already."""
        if not self._refused:
            self._disarm()
            super().send_400_response(msg)


def bounded_protocol(limits: HttpLimits) -> type[asyncio.Protocol]:
    """The ``http=`` argument for uvicorn: the bounded protocol with ``limits``.

    A partial of a module-level class, so ``--workers N`` (spawned processes) can pickle it;
    uvicorn only ever calls it as it would the class.
    """
    made: Any = functools.partial(BoundedHttpToolsProtocol, limits=limits)
    return made  # type: ignore[no-any-return]


def uvicorn_options(settings: Settings) -> dict[str, Any]:
    """The keyword arguments of ``uvicorn.run`` that bound clients and name trusted proxies."""
    limits = HttpLimits.from_settings(settings)
    return {
        "http": bounded_protocol(limits),
        "timeout_keep_alive": limits.keep_alive_seconds,
        # uvicorn's own cap on connections and running requests (503 past it), beside ours.
        "limit_concurrency": limits.max_connections,
        # X-Forwarded-For / X-Forwarded-Proto are believed from these addresses only.
        "proxy_headers": True,
        "forwarded_allow_ips": list(settings.service_trusted_proxies),
        # With --workers N: how long a child may take to answer the supervisor's ping.
        "timeout_worker_healthcheck": settings.service_worker_healthcheck_seconds,
    }


__all__ = [
    "BoundedHttpToolsProtocol",
    "HttpLimits",
    "bounded_protocol",
    "refusal",
    "uvicorn_options",
]
