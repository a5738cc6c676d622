"""The thin layer between the sandbox's ASGI app and the socket: uvicorn, adjusted three ways.

uvicorn (httptools parser, uvloop) does the HTTP/1.1: framing, keep-alive, pipelining,
``Expect: 100-continue``. This module adds only what ASGI cannot express:

* **The connection in the scope.** Two faults the sandbox plays have no ASGI message: *drop*
  (read the request, close the connection without a word, as a crashed server or a resetting
  proxy does) and *garbled* (answer bytes that are not HTTP). :class:`_Protocol`, a small
  subclass of uvicorn's ``HttpToolsProtocol``, puts the connection's transport and id into each
  request's ``scope["extensions"]["sandbox.connection"]``; :func:`drop` and :func:`garble` use
  it. The same subclass counts connections as they open and close (``/_sandbox/stats``), turns
  uvicorn's access log off for its connections only (the benchmark drives thousands of requests
  a second; uvicorn's own switch would silence every uvicorn in the process), and answers an
  unparseable request with the sandbox's JSON ErrorMessage instead of uvicorn's plain text.
* **Stop drops everything in flight.** A hung request or one waiting out a 60 s delay must not
  hold up ``stop()``: :class:`_Server` aborts every connection and cancels the requests' tasks
  instead of uvicorn's graceful wait, and wakes at once instead of polling every 100 ms.
* **Our sockets, our signals.** The caller binds the listening sockets (:func:`listen`), so a
  taken port fails in the caller's thread and port 0 is known before the loop runs; one server
  listens on several (one per geolocation), and :meth:`Serving.add` adds one while it runs. Each
  connection learns its geolocation from its listening port (the counter's answer), and it goes
  into the scope next to the connection (:func:`connection_geolocation`). Signals are the
  caller's to install (uvicorn re-raises the one it caught after shutting down, which would turn
  a clean SIGTERM exit into a death by signal).

It leans on uvicorn's protocol and server classes (their ``connection_made``/``connection_lost``,
``on_message_begin``, ``send_400_response``, ``startup``/``main_loop``/``shutdown`` hooks, as of
uvicorn 0.54): tests/integration/test_sandbox.py exercises each adjustment, so an upgrade that
moves them fails there first.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import threading
from collections.abc import Awaitable, Callable, Generator
from types import FrameType
from typing import Any, Protocol, cast

import uvicorn
from starlette.types import ASGIApp, Scope
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from sandbox.v4 import error_answer

__all__ = [
    "CONNECTION",
    "ConnectionCounter",
    "Serving",
    "connection_geolocation",
    "connection_id",
    "drop",
    "garble",
    "listen",
]

CONNECTION = "sandbox.connection"
BACKLOG = 4096  # thousands of benchmark clients may connect at once
# Idle keep-alive connections stay open, as the real API's do for the worker's connection pool;
# uvicorn's default (5 s) would close them under a client about to reuse one.
KEEP_ALIVE_SECONDS = 24 * 3600
GARBLE = b"\x00SANDBOX GARBLED ANSWER: this is not HTTP\xff\r\n\r\n"
_ADD_TIMEOUT_SECONDS = 10.0


class ConnectionCounter(Protocol):
    """What the protocol reports connections to (the sandbox's ledger, under its lock)."""

    def connection_opened(self, port: int) -> tuple[int, str]: ...

    def connection_closed(self, geolocation: str) -> None: ...


class _Config(uvicorn.Config):
    """uvicorn's config for the sandbox: our protocol class, no lifespan, no websockets."""

    def __init__(self, app: ASGIApp, counter: ConnectionCounter) -> None:
        super().__init__(
            app,
            http=_Protocol,
            loop="uvloop",
            lifespan="off",
            ws="none",
            interface="asgi3",
            log_config=None,  # leave the process' logging alone
            proxy_headers=False,
            server_header=False,
            date_header=False,
            timeout_keep_alive=KEEP_ALIVE_SECONDS,
            backlog=BACKLOG,
        )
        self.counter = counter


class _Protocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, with the connection in the scope (see the module doc)."""

    def __init__(
        self,
        config: uvicorn.Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.access_log = False
        self._counter = cast(_Config, config).counter
        self._extensions: dict[str, dict[object, object]] = {}
        self._geolocation = ""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        sockname = transport.get_extra_info("sockname")
        port = int(sockname[1]) if isinstance(sockname, tuple) else 0
        connection_id, self._geolocation = self._counter.connection_opened(port)
        connection: dict[object, object] = {
            "id": connection_id,
            "transport": transport,
            "geolocation": self._geolocation,
        }
        self._extensions = {CONNECTION: connection}

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._counter.connection_closed(self._geolocation)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.scope["extensions"] = self._extensions

    def send_400_response(self, msg: str) -> None:
        answer = error_answer(400, msg)
        head = [b"HTTP/1.1 400 Bad Request\r\n"]
        head.extend(name + b": " + value + b"\r\n" for name, value in answer.head())
        head.append(b"connection: close\r\n\r\n")
        self.transport.write(b"".join(head) + answer.body)
        self.transport.close()


def _connection(scope: Scope) -> dict[object, object]:
    return cast(dict[object, object], scope["extensions"][CONNECTION])


def connection_id(scope: Scope) -> int:
    """The id of the connection a request came on (1, 2, ... since the server started)."""
    return cast(int, _connection(scope)["id"])


def connection_geolocation(scope: Scope) -> str:
    """The geolocation whose port the request's connection came to."""
    return cast(str, _connection(scope)["geolocation"])


def drop(scope: Scope) -> None:
    """Close the request's connection without answering; the app then awaits the disconnect."""
    cast(asyncio.Transport, _connection(scope)["transport"]).close()


def garble(scope: Scope) -> None:
    """Answer bytes that are not HTTP and close; the app then awaits the disconnect."""
    transport = cast(asyncio.Transport, _connection(scope)["transport"])
    transport.write(GARBLE)
    transport.close()


class _Server(uvicorn.Server):
    """uvicorn's server that stops at once, dropping what is in flight (see the module doc)."""

    def __init__(self, config: uvicorn.Config, on_started: Callable[[], Awaitable[None]]) -> None:
        super().__init__(config)
        self._on_started = on_started
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake = asyncio.Event()

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield  # Serving.run installs its own handlers, or none off the main thread

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)
        if self.started:
            await self._on_started()

    async def listen_on(self, sock: socket.socket) -> None:
        """Serve one more listening socket, as ``startup`` serves the first ones."""
        config = self.config

        def create_protocol() -> asyncio.Protocol:
            return config.http_protocol_class(  # type: ignore[call-arg]
                config=config, server_state=self.server_state, app_state=self.lifespan.state
            )

        loop = asyncio.get_running_loop()
        server = await loop.create_server(create_protocol, sock=sock, backlog=config.backlog)
        self.servers.append(server)

    def listen_soon(self, sock: socket.socket) -> None:
        """:meth:`listen_on` from another thread, once it serves; waits for it."""
        loop = self._loop
        if loop is None or self.should_exit:
            raise RuntimeError("the sandbox is not serving")
        future = asyncio.run_coroutine_threadsafe(self.listen_on(sock), loop)
        future.result(_ADD_TIMEOUT_SECONDS)

    async def main_loop(self) -> None:
        # uvicorn's loop ticks every 100 ms for its Date header and request limits; the sandbox
        # sends no Date header and has no limit, so it just waits to be told to stop.
        while not self.should_exit:
            await self._wake.wait()
            self._wake.clear()

    def stop(self) -> None:
        """Ask the server to stop, from any thread."""
        self.should_exit = True
        loop = self._loop
        if loop is not None:
            # The loop may have closed between the read and the call.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._wake.set)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in self.servers:
            server.close()
        for sock in sockets or []:
            sock.close()
        for connection in list(self.server_state.connections):
            connection.transport.abort()
        await asyncio.sleep(0)  # connection_lost runs: hung requests see their disconnect
        tasks = list(self.server_state.tasks)
        for task in tasks:
            task.cancel()  # delayed answers: their sleep ends here
        await asyncio.gather(*tasks, return_exceptions=True)
        for server in self.servers:
            await server.wait_closed()


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (0: a free port); OSError when the port is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family, backlog=BACKLOG)


def port_of(sock: socket.socket) -> int:
    """The port a listening socket is bound to."""
    return int(sock.getsockname()[1])


class Serving:
    """One run of the sandbox's server: bound sockets, then uvicorn on a uvloop loop."""

    def __init__(
        self, app: ASGIApp, counter: ConnectionCounter, sockets: list[socket.socket]
    ) -> None:
        if not sockets:
            raise ValueError("Serving needs at least one listening socket")
        self._sockets = list(sockets)  # closed when the run ends
        self.port = port_of(sockets[0])
        self.started = False
        self._server = _Server(_Config(app, counter), self._mark_started)
        self._on_started: Callable[[], None] | None = None
        # Sockets added before the loop serves wait here; _mark_started serves them.
        self._adding = threading.Lock()
        self._late: list[socket.socket] = []

    async def _mark_started(self) -> None:
        with self._adding:
            self.started = True
            late, self._late = self._late, []
        for sock in late:
            await self._server.listen_on(sock)
        if self._on_started is not None:
            self._on_started()

    def add(self, sock: socket.socket) -> None:
        """Listen on one more socket (it is closed when the run ends); from any thread but the
        loop's. Returns once it is served (or queued, before the server started)."""
        with self._adding:
            self._sockets.append(sock)
            if not self.started:
                self._late.append(sock)
                return
        self._server.listen_soon(sock)

    def run(self, on_started: Callable[[], None], *, install_signals: bool) -> None:
        """Serve in this thread until :meth:`stop`, or SIGINT/SIGTERM with ``install_signals``
        (signals reach only the main thread; elsewhere :meth:`stop` ends it).

        ``on_started`` is called on the loop once uvicorn serves the socket.
        """
        self._on_started = on_started
        with self._adding:
            initial, self._late = list(self._sockets), []
        with contextlib.ExitStack() as stack:
            stack.callback(self._close_sockets)
            if install_signals and threading.current_thread() is threading.main_thread():
                # Before the loop starts, so no signal finds the default handler; restored after,
                # as uvicorn does (signal.signal interrupts uvloop's wait like its own handlers).
                for signum in (signal.SIGINT, signal.SIGTERM):
                    previous = signal.signal(signum, self._on_signal)
                    stack.callback(signal.signal, signum, previous)
            with asyncio.Runner(loop_factory=self._server.config.get_loop_factory()) as runner:
                runner.run(self._server.serve(sockets=initial))

    def _close_sockets(self) -> None:
        with self._adding:
            sockets = list(self._sockets)
        for sock in sockets:
            sock.close()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop serving, dropping hung and delayed requests; from any thread, idempotent."""
        self._server.stop()
