"""HTTP exchanges on libcurl: one multi handle per process, driven by one thread, many in flight.

Why libcurl: the wire protocol (request writing, response parsing, chunked bodies, keep-alive,
TLS, proxies, HTTP/2 where the server offers it) is the most deployed HTTP client's job, not
ours. Why one multi handle: a worker thread hands over every post of its batch at once and they
overlap on the network, so a thread keeps many posts in flight, and the process shares one
connection cache (docs/performance.md has the measurements that chose it).

How: ``CurlTransport.submit`` queues exchanges and wakes the engine thread (a socket pair,
written only when the engine is not already due to look); the engine adds an easy handle per
exchange to the multi handle, runs libcurl's event API (``socket_action`` with socket and timer
callbacks, an epoll selector), and calls each exchange's ``done`` callback, on the engine
thread, when libcurl reports the transfer finished. Only the engine thread touches libcurl
handles (libcurl's rule: one handle, one thread at a time). Callbacks rather than futures: a
``Future`` with ``as_completed`` cost a sixth of a worker's CPU in notifications (py-spy).

What every exchange gets (``_configure``): a total deadline (``CURLOPT_TIMEOUT_MS`` covers
connect, any wait for a free connection, sending and reading), a bounded response
(``CURLOPT_MAXFILESIZE`` plus a write callback that stops at the bound), proxies from the
environment (libcurl's default: ``https_proxy``, ``http_proxy``, ``ALL_PROXY``, ``NO_PROXY``),
TLS peer and host verification (certifi's bundle, or ``SSL_CERT_FILE``), HTTP and HTTPS only, no
redirects followed, and no request resent by libcurl: the body is read through a callback with
no seek callback, so libcurl's "connection died, retrying on a fresh connect" fails with
``CURLE_SEND_FAIL_REWIND`` instead of posting the message a second time.

Failures, as an ``ExchangeFailed.kind``::

    ExchangeFailed
     ├── timeout    the deadline passed (connecting, waiting for a connection, or mid-answer)
     ├── connect    no connection: refused, unresolvable, TLS handshake or certificate refused
     └── protocol   the exchange broke after it began: reset, closed early, garbled answer,
                    an answer larger than the bound, a resend libcurl was refused

A request is never retried here: a POST that may have reached the server is the caller's to
decide about (``outcomes.classify``).
"""

from __future__ import annotations

import collections
import contextlib
import io
import logging
import os
import queue
import selectors
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import certifi
import pycurl

log = logging.getLogger("notify.transport")

MAX_RESPONSE_BYTES = 64 * 1024
_LINE_BREAKS = ("\r", "\n", "\0")

_TIMEOUT_CODES = frozenset({pycurl.E_OPERATION_TIMEDOUT})
_CONNECT_CODES = frozenset(
    {
        pycurl.E_COULDNT_RESOLVE_PROXY,
        pycurl.E_COULDNT_RESOLVE_HOST,
        pycurl.E_COULDNT_CONNECT,
        pycurl.E_SSL_CONNECT_ERROR,
        pycurl.E_PEER_FAILED_VERIFICATION,
        pycurl.E_SSL_CACERT_BADFILE,
    }
)


@dataclass(frozen=True, slots=True)
class Exchange:
    """One request to send: ``headers`` as ``Name: value`` lines, ``body`` whole."""

    method: str
    url: str
    headers: tuple[str, ...]
    body: bytes
    timeout_seconds: float
    connect_timeout_seconds: float


@dataclass(frozen=True, slots=True)
class Answer:
    """The final answer: status, the response headers (names lower-cased), the body."""

    status: int
    headers: dict[str, str]
    body: bytes
    elapsed_seconds: float


class ExchangeFailed(Exception):
    """No answer: ``kind`` is ``timeout``, ``connect`` or ``protocol`` (see the module tree)."""

    def __init__(self, kind: str, detail: str, elapsed_seconds: float) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail
        self.elapsed_seconds = elapsed_seconds


Done = Callable[["Answer | ExchangeFailed"], None]
"""Called once per exchange, on the engine thread, with its answer or why there was none."""


def failure_kind(code: int) -> str:
    """The ``ExchangeFailed.kind`` of a libcurl error code."""
    if code in _TIMEOUT_CODES:
        return "timeout"
    if code in _CONNECT_CODES:
        return "connect"
    return "protocol"


@dataclass(slots=True)
class AnswerReader:
    """libcurl's write and header callbacks for one answer: at most ``MAX_RESPONSE_BYTES`` of
    body, and the final answer's headers (names lower-cased)."""

    chunks: list[bytes] = field(default_factory=list)
    size: int = 0
    headers: dict[str, str] = field(default_factory=dict)

    def write(self, chunk: bytes) -> int | None:
        """``CURLOPT_WRITEFUNCTION``: keep ``chunk``, or stop the transfer past the bound."""
        # Returning a count other than len(chunk) makes libcurl stop with CURLE_WRITE_ERROR: the
        # bound holds even for a body whose size was not announced.
        self.size += len(chunk)
        if self.size > MAX_RESPONSE_BYTES:
            return 0
        self.chunks.append(chunk)
        return None

    def header(self, line: bytes) -> None:
        """``CURLOPT_HEADERFUNCTION``: keep one header line of the final answer."""
        # libcurl hands over each header line of each response it reads, interim 1xx answers
        # included; a status line starts a new set, so only the final answer's headers stay.
        if line.startswith(b"HTTP/"):
            self.headers.clear()
            return
        name, colon, value = line.partition(b":")
        if colon:
            self.headers[name.strip().lower().decode("latin-1")] = value.strip().decode("latin-1")

    def body(self) -> bytes:
        """The body read so far, whole."""
        return b"".join(self.chunks)


@dataclass(slots=True)
class _Transfer:
    """One exchange on its easy handle: what was asked, and what came back so far."""

    exchange: Exchange
    done: Done
    started: float = field(default_factory=time.perf_counter)
    read: AnswerReader = field(default_factory=AnswerReader)


def _ca_bundle() -> str:
    return os.environ.get("SSL_CERT_FILE") or certifi.where()


def _call(done: Done, result: Answer | ExchangeFailed) -> None:
    # A callback's bug must not end the engine thread (every later exchange would hang).
    try:
        done(result)
    except Exception:
        log.exception("an exchange's completion callback failed")


class CurlTransport:
    """Runs exchanges on one libcurl multi handle from one engine thread; thread-safe."""

    def __init__(self, max_connections: int = 256, *, ca_bundle: str | None = None) -> None:
        self._max_connections = max_connections
        self._ca_bundle = ca_bundle or _ca_bundle()
        self._incoming: collections.deque[_Transfer] = collections.deque()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._closing = False
        self._woken = False  # a wake-up byte is on its way and the engine has not yet looked
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)

    def submit(self, items: Iterable[tuple[Exchange, Done]]) -> None:
        """Start each exchange; its ``done`` gets the ``Answer`` or an ``ExchangeFailed``."""
        transfers = [_Transfer(exchange, done) for exchange, done in items]
        with self._lock:
            if self._closing:
                raise RuntimeError("the transport is closed")
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="curl-engine", daemon=True)
                self._thread.start()
            self._incoming.extend(transfers)
            wake, self._woken = not self._woken, True
        if wake:
            self._wake()

    def request(self, exchange: Exchange) -> Answer:
        """Run one exchange and wait for it; raises ``ExchangeFailed``."""
        results: queue.SimpleQueue[Answer | ExchangeFailed] = queue.SimpleQueue()
        self.submit([(exchange, results.put)])
        result = results.get()
        if isinstance(result, ExchangeFailed):
            raise result
        return result

    def close(self) -> None:
        """Stop the engine: transfers in flight fail as ``protocol``; idempotent."""
        with self._lock:
            self._closing = True
            thread = self._thread
        self._wake()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=10)

    def _wake(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            self._wake_w.send(b"\0")

    # -- the engine thread -----------------------------------------------------------------

    def _run(self) -> None:
        engine = _Engine(self._max_connections, self._ca_bundle, self._wake_r)
        try:
            while True:
                with self._lock:
                    closing = self._closing
                    batch = list(self._incoming)
                    self._incoming.clear()
                    self._woken = False
                for transfer in batch:
                    engine.add(transfer)
                if closing:
                    break
                engine.step()
        finally:
            with self._lock:
                leftover = list(self._incoming)
                self._incoming.clear()
            engine.close(leftover)
            self._wake_r.close()
            self._wake_w.close()


class _Engine:
    """libcurl's multi-socket API on a selector; lives and dies on the engine thread."""

    def __init__(self, max_connections: int, ca_bundle: str, wake: socket.socket) -> None:
        self.ca_bundle = ca_bundle
        self.wake = wake
        self.selector = selectors.DefaultSelector()
        self.selector.register(wake, selectors.EVENT_READ)
        self.multi = pycurl.CurlMulti()
        self.multi.setopt(pycurl.M_SOCKETFUNCTION, self._on_socket)
        self.multi.setopt(pycurl.M_TIMERFUNCTION, self._on_timer)
        self.multi.setopt(pycurl.M_MAX_TOTAL_CONNECTIONS, max_connections)
        self.multi.setopt(pycurl.M_MAXCONNECTS, max_connections)
        self.timer_at: float | None = None
        self.active: dict[pycurl.Curl, _Transfer] = {}
        self.idle: list[pycurl.Curl] = []

    def _on_socket(self, event: int, fd: int, _multi: object, _data: object) -> None:
        if event == pycurl.POLL_REMOVE:
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(fd)
            return
        mask = 0
        if event in (pycurl.POLL_IN, pycurl.POLL_INOUT):
            mask |= selectors.EVENT_READ
        if event in (pycurl.POLL_OUT, pycurl.POLL_INOUT):
            mask |= selectors.EVENT_WRITE
        try:
            self.selector.modify(fd, mask)
        except KeyError:
            self.selector.register(fd, mask)

    def _on_timer(self, timeout_ms: int) -> None:
        self.timer_at = None if timeout_ms < 0 else time.monotonic() + timeout_ms / 1000

    def _handle(self) -> pycurl.Curl:
        if self.idle:
            return self.idle.pop()
        curl = pycurl.Curl()
        # Options that never change for this handle.
        curl.setopt(pycurl.NOSIGNAL, 1)
        curl.setopt(pycurl.PROTOCOLS, pycurl.PROTO_HTTP | pycurl.PROTO_HTTPS)
        curl.setopt(pycurl.FOLLOWLOCATION, 0)
        curl.setopt(pycurl.MAXFILESIZE, MAX_RESPONSE_BYTES)
        curl.setopt(pycurl.SSL_VERIFYPEER, 1)
        curl.setopt(pycurl.SSL_VERIFYHOST, 2)
        curl.setopt(pycurl.CAINFO, self.ca_bundle)
        curl.setopt(pycurl.NOPROGRESS, 1)
        return curl

    def add(self, transfer: _Transfer) -> None:
        exchange = transfer.exchange
        if any(bad in line for line in exchange.headers for bad in _LINE_BREAKS):
            # libcurl sends header lines as given: a CR or LF would split the request.
            _call(
                transfer.done, ExchangeFailed("protocol", "a header would split the request", 0.0)
            )
            return
        curl = self._handle()
        try:
            curl.setopt(pycurl.URL, exchange.url)
            if exchange.method != "POST":
                curl.setopt(pycurl.CUSTOMREQUEST, exchange.method)
            curl.setopt(pycurl.HTTPHEADER, [*exchange.headers, "Expect:"])
            # The body through a read callback and no seek callback: libcurl cannot rewind it,
            # so it can never resend the request on its own (see the module docstring).
            curl.setopt(pycurl.UPLOAD, 0)
            curl.setopt(pycurl.POST, 1)
            curl.setopt(pycurl.READFUNCTION, io.BytesIO(exchange.body).read)
            curl.setopt(pycurl.POSTFIELDSIZE, len(exchange.body))
            curl.setopt(pycurl.WRITEFUNCTION, transfer.read.write)
            curl.setopt(pycurl.HEADERFUNCTION, transfer.read.header)
            curl.setopt(pycurl.TIMEOUT_MS, max(1, int(exchange.timeout_seconds * 1000)))
            curl.setopt(
                pycurl.CONNECTTIMEOUT_MS, max(1, int(exchange.connect_timeout_seconds * 1000))
            )
            self.multi.add_handle(curl)
        except pycurl.error as error:
            curl.close()
            _call(transfer.done, ExchangeFailed("protocol", f"could not start: {error}", 0.0))
            return
        self.active[curl] = transfer

    def step(self) -> None:
        """Wait for the next socket event or timer, let libcurl act, finish what it finished."""
        timeout = None
        if self.timer_at is not None:
            timeout = max(0.0, self.timer_at - time.monotonic())
        for key, events in self.selector.select(timeout):
            if key.fileobj is self.wake:
                with contextlib.suppress(BlockingIOError):
                    while self.wake.recv(4096):
                        pass
                continue
            flags = 0
            if events & selectors.EVENT_READ:
                flags |= pycurl.CSELECT_IN
            if events & selectors.EVENT_WRITE:
                flags |= pycurl.CSELECT_OUT
            self._act(key.fd, flags)
        if self.timer_at is not None and time.monotonic() >= self.timer_at:
            self.timer_at = None
            self._act(pycurl.SOCKET_TIMEOUT, 0)
        self._finish()

    def _act(self, fd: int, flags: int) -> None:
        while True:
            result, _running = self.multi.socket_action(fd, flags)
            if result != pycurl.E_CALL_MULTI_PERFORM:
                return

    def _finish(self) -> None:
        while True:
            _queued, done, failed = self.multi.info_read()
            for curl in done:
                self._complete(curl, None, "")
            for curl, code, message in failed:
                self._complete(curl, code, message)
            if _queued == 0:
                return

    def _complete(self, curl: pycurl.Curl, code: int | None, message: str) -> None:
        transfer = self.active.pop(curl)
        elapsed = time.perf_counter() - transfer.started
        status = curl.getinfo(pycurl.RESPONSE_CODE) if code is None else 0
        self.multi.remove_handle(curl)
        self.idle.append(curl)
        if code is not None:
            _call(
                transfer.done,
                ExchangeFailed(failure_kind(code), f"curl error {code}: {message}", elapsed),
            )
        else:
            _call(
                transfer.done, Answer(status, transfer.read.headers, transfer.read.body(), elapsed)
            )

    def close(self, leftover: list[_Transfer]) -> None:
        for curl, transfer in list(self.active.items()):
            self.multi.remove_handle(curl)
            curl.close()
            _call(transfer.done, ExchangeFailed("protocol", "the transport closed", 0.0))
        self.active.clear()
        for transfer in leftover:
            _call(transfer.done, ExchangeFailed("protocol", "the transport closed", 0.0))
        for curl in self.idle:
            curl.close()
        self.idle.clear()
        self.multi.close()
        self.selector.close()
