"""An ``httpx`` transport over a small pool of ``http.client`` connections.

Why: the work is one small POST per message from dozens of threads sharing one client, so the
connection pool's own cost per request decides throughput. Profiling a worker (py-spy, GIL
samples) showed httpcore's pool spending a sixth of the worker's CPU choosing a connection (it
scans and polls every pooled connection on every request); urllib3's pool, tried next, still
cost more than the HTTP exchange itself. This pool keeps idle connections in a list per origin,
checks the one it takes with a single non-blocking peek (a connection the server has closed is
dropped, never used), and speaks HTTP/1.1 with the standard library. The client stays an
``httpx.Client``: same timeouts, requests, responses and exceptions.

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

import http.client
import select
import ssl
import threading

import httpx

Origin = tuple[str, str, int]


def _alive(connection: http.client.HTTPConnection) -> bool:
    # An idle keep-alive connection has nothing to read. If its socket is readable, the server
    # has closed it (or, for TLS, sent close_notify) or sent stray bytes: it must not carry a
    # request. poll, not select: no limit on descriptor numbers; works for TLS sockets too.
    sock = connection.sock
    if sock is None:
        return False
    poller = select.poll()
    poller.register(sock, select.POLLIN | select.POLLERR | select.POLLHUP)
    return not poller.poll(0)


class PooledTransport(httpx.BaseTransport):
    """Sends ``httpx`` requests over pooled HTTP/1.1 keep-alive connections; thread-safe."""

    def __init__(
        self, max_connections: int = 100, ssl_context: ssl.SSLContext | None = None
    ) -> None:
        self._slots = threading.BoundedSemaphore(max_connections)
        self._idle: dict[Origin, list[http.client.HTTPConnection]] = {}
        self._lock = threading.Lock()
        self._ssl = ssl_context or ssl.create_default_context()

    def _checkout(self, origin: Origin) -> http.client.HTTPConnection | None:
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
    ) -> http.client.HTTPConnection:
        scheme, host, port = origin
        connection: http.client.HTTPConnection
        if scheme == "https":
            connection = http.client.HTTPSConnection(
                host, port, timeout=connect_timeout, context=self._ssl
            )
        else:
            connection = http.client.HTTPConnection(host, port, timeout=connect_timeout)
        try:
            connection.connect()
        except TimeoutError as error:
            connection.close()
            raise httpx.ConnectTimeout(
                str(error) or "connect timed out", request=request
            ) from error
        except (OSError, ssl.SSLError) as error:
            connection.close()
            raise httpx.ConnectError(str(error), request=request) from error
        return connection

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        """Send one request and read the whole answer (answers here are small)."""
        timeouts = request.extensions.get("timeout", {})
        url = request.url
        origin: Origin = (url.scheme, url.host, url.port or (443 if url.scheme == "https" else 80))
        if not self._slots.acquire(timeout=timeouts.get("pool")):
            raise httpx.PoolTimeout("no connection became free in time", request=request)
        try:
            connection = self._checkout(origin) or self._connect(
                origin, timeouts.get("connect"), request
            )
            assert connection.sock is not None
            connection.sock.settimeout(timeouts.get("read"))
            try:
                connection.request(
                    request.method,
                    url.raw_path.decode("ascii"),
                    body=request.read(),
                    headers=dict(request.headers),
                )
                answer = connection.getresponse()
                content = answer.read()
            except TimeoutError as error:
                connection.close()
                raise httpx.ReadTimeout(str(error) or "read timed out", request=request) from error
            except (OSError, http.client.HTTPException, ssl.SSLError) as error:
                connection.close()
                raise httpx.RemoteProtocolError(
                    f"{type(error).__name__}: {error}", request=request
                ) from error
            if answer.will_close:
                connection.close()
            else:
                with self._lock:
                    self._idle.setdefault(origin, []).append(connection)
            return httpx.Response(
                answer.status, headers=answer.getheaders(), content=content, request=request
            )
        finally:
            self._slots.release()

    def close(self) -> None:
        """Close every idle connection."""
        with self._lock:
            for connections in self._idle.values():
                for connection in connections:
                    connection.close()
            self._idle.clear()
