"""An ``httpx`` transport over a small pool of ``http.client`` connections.

Why: the work is one small POST per message from dozens of threads sharing one client, so the
connection pool's own cost per request decides throughput. Profiling a worker (py-spy, GIL
samples) showed httpcore's pool spending a sixth of the worker's CPU choosing a connection (it
scans and polls every pooled connection on every request); urllib3's pool, tried next, still
cost more than the HTTP exchange itself. This pool keeps idle connections in a list per origin,
checks the one it takes with a single non-blocking peek (a connection the server has closed is
dropped, never used). The standard library opens connections (TCP, TLS with certificate and host
name checks); the exchange itself is written and read here: one ``sendall`` of the request, and
a response read from a buffered socket reader. ``http.client`` did that part too at first, but
its header parsing goes through the ``email`` package, and that alone was a third of the CPU a
post cost (py-spy). Callers see httpx's requests, responses and exceptions.

What is read: one HTTP/1.x response per request, after any interim 1xx; a body delimited by
``Content-Length``, by chunked transfer coding, or by the connection's close (which then is not
reused). Lines and header counts are bounded; anything malformed is a protocol error and the
connection is closed.

Exceptions are httpx's, so callers see one family::

    connect timed out                         → httpx.ConnectTimeout
    refused, unreachable, TLS failure         → httpx.ConnectError
    no connection free within the pool wait   → httpx.PoolTimeout
    read or write timed out                   → httpx.ReadTimeout / httpx.WriteTimeout
    connection closed or garbled mid-exchange → httpx.RemoteProtocolError

A request is never retried here: a POST that may have reached the server is the caller's to
decide about (``outcomes.classify``).
"""

from __future__ import annotations

import contextlib
import http.client
import select
import socket
import ssl
import threading
from typing import BinaryIO

import httpx

Origin = tuple[str, str, int]

_MAX_LINE_BYTES = 65536
_MAX_HEADERS = 100
_FORBIDDEN_IN_HEADERS = (b"\r", b"\n", b"\0")


class _ProtocolError(Exception):
    """The server's answer is not HTTP/1.x as this reader accepts it."""


class _Connection:
    """One open socket and its buffered reader."""

    __slots__ = ("reader", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.reader: BinaryIO = sock.makefile("rb")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.reader.close()
        with contextlib.suppress(OSError):
            self.sock.close()


def _alive(connection: _Connection) -> bool:
    # An idle keep-alive connection has nothing to read. If its socket is readable, the server
    # has closed it (or, for TLS, sent close_notify) or sent stray bytes: it must not carry a
    # request. poll, not select: no limit on descriptor numbers; works for TLS sockets too.
    poller = select.poll()
    poller.register(connection.sock, select.POLLIN | select.POLLERR | select.POLLHUP)
    return not poller.poll(0)


def request_bytes(request: httpx.Request, body: bytes) -> bytes:
    """The request line, headers and body as sent; refuses a header that could split lines."""
    head = [f"{request.method} {request.url.raw_path.decode('ascii')} HTTP/1.1".encode("ascii")]
    for name, value in request.headers.raw:
        if any(bad in name or bad in value for bad in _FORBIDDEN_IN_HEADERS) or b":" in name:
            raise httpx.LocalProtocolError(f"invalid header {name!r}", request=request)
        head.append(name + b": " + value)
    return b"\r\n".join(head) + b"\r\n\r\n" + body


def _line(reader: BinaryIO) -> bytes:
    line = reader.readline(_MAX_LINE_BYTES + 1)
    if len(line) > _MAX_LINE_BYTES:
        raise _ProtocolError("a line of the answer is too long")
    if not line.endswith(b"\n"):
        raise _ProtocolError("the connection closed mid-answer")
    return line


def _headers(reader: BinaryIO) -> list[tuple[bytes, bytes]]:
    headers: list[tuple[bytes, bytes]] = []
    while True:
        line = _line(reader)
        if line in (b"\r\n", b"\n"):
            return headers
        if len(headers) >= _MAX_HEADERS:
            raise _ProtocolError("too many headers")
        name, colon, value = line.partition(b":")
        if not colon or not name or name != name.strip():
            raise _ProtocolError("a malformed header line")
        headers.append((name, value.strip()))


def _chunked(reader: BinaryIO) -> bytes:
    chunks: list[bytes] = []
    while True:
        size_text = _line(reader).split(b";", 1)[0].strip()
        try:
            size = int(size_text, 16)
        except ValueError:
            raise _ProtocolError("a malformed chunk size") from None
        if size < 0:
            raise _ProtocolError("a malformed chunk size")
        if size == 0:
            _headers(reader)  # trailers, ignored
            return b"".join(chunks)
        chunk = reader.read(size)
        if len(chunk) != size or _line(reader) not in (b"\r\n", b"\n"):
            raise _ProtocolError("the connection closed mid-chunk")
        chunks.append(chunk)


def read_response(reader: BinaryIO) -> tuple[int, list[tuple[bytes, bytes]], bytes, bool]:
    """One response: ``(status, headers, body, reusable)``; interim 1xx answers are skipped."""
    while True:
        status_line = reader.readline(_MAX_LINE_BYTES + 1)
        if not status_line:
            raise _ProtocolError("the server closed the connection without answering")
        if len(status_line) > _MAX_LINE_BYTES or not status_line.endswith(b"\n"):
            raise _ProtocolError("a malformed status line")
        parts = status_line.split(None, 2)
        if len(parts) < 2 or parts[0] not in (b"HTTP/1.1", b"HTTP/1.0") or len(parts[1]) != 3:
            raise _ProtocolError("a malformed status line")
        try:
            status = int(parts[1])
        except ValueError:
            raise _ProtocolError("a malformed status line") from None
        if status < 100:
            raise _ProtocolError("a malformed status line")
        headers = _headers(reader)
        if status >= 200 or status == 101:
            break
    fields: dict[bytes, list[bytes]] = {}
    for name, value in headers:
        fields.setdefault(name.lower(), []).append(value)
    tokens = {t.strip().lower() for v in fields.get(b"connection", []) for t in v.split(b",")}
    reusable = b"close" not in tokens and (parts[0] == b"HTTP/1.1" or b"keep-alive" in tokens)
    codings = [
        t.strip().lower() for v in fields.get(b"transfer-encoding", []) for t in v.split(b",")
    ]
    lengths = {v.strip() for v in fields.get(b"content-length", [])}
    if codings:
        if codings[-1] == b"chunked":
            body = _chunked(reader)
        else:  # delimited by the close
            body, reusable = reader.read(), False
    elif lengths:
        if len(lengths) != 1 or not next(iter(lengths)).isdigit():
            raise _ProtocolError("a malformed Content-Length")
        size = int(next(iter(lengths)))
        body = reader.read(size)
        if len(body) != size:
            raise _ProtocolError("the connection closed mid-body")
    elif status in (204, 304) or status < 200:
        body = b""
    else:
        body, reusable = reader.read(), False
    return status, headers, body, reusable


class PooledTransport(httpx.BaseTransport):
    """Sends ``httpx`` requests over pooled HTTP/1.1 keep-alive connections; thread-safe."""

    def __init__(
        self, max_connections: int = 100, ssl_context: ssl.SSLContext | None = None
    ) -> None:
        self._slots = threading.BoundedSemaphore(max_connections)
        self._idle: dict[Origin, list[_Connection]] = {}
        self._lock = threading.Lock()
        self._ssl = ssl_context or ssl.create_default_context()

    def _checkout(self, origin: Origin) -> _Connection | None:
        with self._lock:
            idle = self._idle.get(origin)
            while idle:
                connection = idle.pop()
                if _alive(connection):
                    return connection
                connection.close()
        return None

    def _connect(
        self, origin: Origin, connect_timeout: float | None, request: httpx.Request
    ) -> _Connection:
        scheme, host, port = origin
        opener: http.client.HTTPConnection
        if scheme == "https":
            opener = http.client.HTTPSConnection(
                host, port, timeout=connect_timeout, context=self._ssl
            )
        else:
            opener = http.client.HTTPConnection(host, port, timeout=connect_timeout)
        try:
            opener.connect()
        except TimeoutError as error:
            opener.close()
            raise httpx.ConnectTimeout(
                str(error) or "connect timed out", request=request
            ) from error
        except (OSError, ssl.SSLError) as error:
            opener.close()
            raise httpx.ConnectError(str(error), request=request) from error
        assert opener.sock is not None
        return _Connection(opener.sock)

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        """Send one request and read the whole answer (answers here are small)."""
        timeouts = request.extensions.get("timeout", {})
        url = request.url
        origin: Origin = (url.scheme, url.host, url.port or (443 if url.scheme == "https" else 80))
        payload = request_bytes(request, request.read())
        if not self._slots.acquire(timeout=timeouts.get("pool")):
            raise httpx.PoolTimeout("no connection became free in time", request=request)
        try:
            connection = self._checkout(origin) or self._connect(
                origin, timeouts.get("connect"), request
            )
            connection.sock.settimeout(timeouts.get("read"))
            try:
                connection.sock.sendall(payload)
                status, headers, content, reusable = read_response(connection.reader)
            except TimeoutError as error:
                connection.close()
                raise httpx.ReadTimeout(str(error) or "read timed out", request=request) from error
            except (OSError, ssl.SSLError, _ProtocolError) as error:
                connection.close()
                raise httpx.RemoteProtocolError(
                    f"{type(error).__name__}: {error}", request=request
                ) from error
            if reusable:
                with self._lock:
                    self._idle.setdefault(origin, []).append(connection)
            else:
                connection.close()
            return httpx.Response(status, headers=headers, content=content, request=request)
        finally:
            self._slots.release()

    def close(self) -> None:
        """Close every idle connection."""
        with self._lock:
            for connections in self._idle.values():
                for connection in connections:
                    connection.close()
            self._idle.clear()
