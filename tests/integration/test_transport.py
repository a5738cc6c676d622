"""The libcurl transport against real sockets: overlap, keep-alive, deadlines, bounds, proxies, TLS.

Hostile or broken servers are real socket servers on loopback that answer with scripted bytes,
so each test shows what libcurl (and our thin layer over it) makes of what a server really sent.
"""

from __future__ import annotations

import datetime
import json
import queue
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sandbox.redisserver import free_port
from worker.concur.client import ConcurClient
from worker.concur.transport import (
    MAX_RESPONSE_BYTES,
    Answer,
    CurlTransport,
    Exchange,
    ExchangeFailed,
)
from worker.rules.outcomes import ApiResponse, TransportFailure
from worker.shapes.models import Message

# What a scripted server does with one request on a connection: write what it likes, and say
# whether the connection stays open for the next request.
Plan = Callable[[socket.socket, bytes], bool]

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nconcur-correlationid: cid-1\r\n\r\n"


def _answer(raw: bytes, keep: bool = True) -> Plan:
    def plan(connection: socket.socket, _request: bytes) -> bool:
        connection.sendall(raw)
        return keep

    return plan


def _read_request(connection: socket.socket, buffered: bytes) -> tuple[bytes, bytes] | None:
    data = buffered
    while b"\r\n\r\n" not in data:
        chunk = connection.recv(65536)
        if not chunk:
            return None
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(rest) < length:
        chunk = connection.recv(65536)
        if not chunk:
            return None
        rest += chunk
    return head + b"\r\n\r\n" + rest[:length], rest[length:]


class ScriptedServer:
    """A loopback HTTP/1.1 server: the n-th request it reads is answered by the n-th plan."""

    def __init__(self, plans: list[Plan], *, tls: ssl.SSLContext | None = None) -> None:
        self.plans = list(plans)
        self.requests: list[bytes] = []
        self.connections = 0
        self._lock = threading.Lock()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.tls = tls
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, path: str = "/messages/u/session", host: str = "127.0.0.1") -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://{host}:{self.port}{path}"

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:
                return
            if self.tls is not None:
                try:
                    connection = self.tls.wrap_socket(connection, server_side=True)
                except (OSError, ssl.SSLError):
                    connection.close()
                    continue
            with self._lock:
                self.connections += 1
            threading.Thread(target=self._serve, args=(connection,), daemon=True).start()

    def _serve(self, connection: socket.socket) -> None:
        buffered = b""
        with connection:
            while True:
                try:
                    read = _read_request(connection, buffered)
                except OSError:
                    return
                if read is None:
                    return
                request, buffered = read
                with self._lock:
                    self.requests.append(request)
                    plan = self.plans.pop(0) if self.plans else _answer(OK)
                try:
                    if not plan(connection, request):
                        return
                except OSError:
                    return

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def serve() -> Iterator[Callable[..., ScriptedServer]]:
    servers: list[ScriptedServer] = []

    def start(plans: list[Plan], **kwargs: object) -> ScriptedServer:
        server = ScriptedServer(plans, **kwargs)  # type: ignore[arg-type]
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.close()


@pytest.fixture
def transport() -> Iterator[CurlTransport]:
    engine = CurlTransport(16)
    yield engine
    engine.close()


def _post(url: str, timeout: float = 5.0, headers: tuple[str, ...] = ()) -> Exchange:
    return Exchange("POST", url, ("Content-Type: application/json", *headers), b"{}", timeout, 2.0)


def _fails(transport: CurlTransport, exchange: Exchange) -> ExchangeFailed:
    with pytest.raises(ExchangeFailed) as caught:
        transport.request(exchange)
    return caught.value


def test_keep_alive_connections_are_reused(serve, transport: CurlTransport) -> None:
    server = serve([])
    for _ in range(20):
        answer = transport.request(_post(server.url()))
        assert (answer.status, answer.headers["concur-correlationid"]) == (200, "cid-1")
    assert (len(server.requests), server.connections) == (20, 1)


def test_posts_submitted_together_are_in_flight_together(sandbox, user_id) -> None:
    sandbox.script([], user_id=user_id, then={"status": 200, "delayMs": 250})
    engine = CurlTransport(64)
    try:
        url = f"{sandbox.url}/messages/{user_id}/session"
        started = time.perf_counter()
        results: queue.SimpleQueue[Answer | ExchangeFailed] = queue.SimpleQueue()
        engine.submit(
            (
                Exchange(
                    "POST",
                    url,
                    (
                        "Authorization: Bearer test-secret-token-4f1c",
                        "Content-Type: application/json",
                    ),
                    json.dumps({"sessionId": f"s{n}", "templateId": "t", "context": {}}).encode(),
                    5.0,
                    2.0,
                ),
                results.put,
            )
            for n in range(40)
        )
        statuses = [getattr(results.get(timeout=5), "status", None) for _ in range(40)]
        elapsed = time.perf_counter() - started
    finally:
        engine.close()
    assert statuses == [200] * 40
    assert elapsed < 1.5, f"40 posts of 250 ms took {elapsed:.2f}s: they did not overlap"


def test_refused_connection_is_a_connect_failure(transport: CurlTransport) -> None:
    assert _fails(transport, _post(f"http://127.0.0.1:{free_port()}/x")).kind == "connect"


def test_a_slow_answer_is_a_timeout_at_the_deadline(sandbox, user_id) -> None:
    # The answer would take 5 s; the deadline ends the attempt long before (the bound leaves a
    # busy machine room, and still tells 0.3 s from 5 s).
    sandbox.script([{"status": 200, "delayMs": 5000}], user_id=user_id)
    client = ConcurClient(sandbox.url, timeout_seconds=0.3, max_connections=2)
    message = Message.create(user_id, "s", "welcome", None)
    try:
        started = time.perf_counter()
        result = client.post_message(message, "test-secret-token-4f1c")
        assert isinstance(result, TransportFailure) and result.kind == "timeout"
        assert time.perf_counter() - started < 3.0
        again = client.post_message(message, "test-secret-token-4f1c")
        assert isinstance(again, ApiResponse) and again.status == 200
    finally:
        client.close()


def test_a_body_dripped_past_the_deadline_is_a_timeout(serve, transport: CurlTransport) -> None:
    # Each byte comes well within any per-read timeout, but the exchange as a whole runs long:
    # only a deadline for the whole attempt ends it (the in-flight lease depends on that).
    def drip(connection: socket.socket, _request: bytes) -> bool:
        connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n")
        for _ in range(100):
            connection.sendall(b"x")
            time.sleep(0.05)
        return False

    server = serve([drip])
    started = time.perf_counter()
    assert _fails(transport, _post(server.url(), timeout=0.6)).kind == "timeout"
    assert time.perf_counter() - started < 3.0  # the drip alone lasts 5 s


def test_a_smuggled_second_answer_is_never_read_as_the_next_requests(
    serve, transport: CurlTransport
) -> None:
    # A 400 with a 201 glued behind it: a client that keeps the leftover bytes would take the
    # 201 as the next request's answer, and record a message delivered that never was.
    smuggling = _answer(
        b'HTTP/1.1 400 Bad Request\r\nContent-Length: 11\r\n\r\n{"errors":1}'[:-1]
        + b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n"
    )
    server = serve([smuggling, _answer(b"HTTP/1.1 503 Unavailable\r\nContent-Length: 0\r\n\r\n")])
    first = transport.request(_post(server.url()))
    second = transport.request(_post(server.url()))
    third = transport.request(_post(server.url()))
    assert first.status == 400
    assert second.status == 503, "the smuggled 201 was read as the next request's answer"
    assert third.status == 200
    assert len(server.requests) == 3


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: " + b"9" * 5000 + b"\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1000000000000000\r\n\r\nabc",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"f" * 40 + b"\r\nabc\r\n",
        b"HTTP/2 200 OK\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 099 OK\r\nContent-Length: 0\r\n\r\n",
        b"garbage\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nabc",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 200 OK\r\n" + b"X: " + b"a" * 400_000 + b"\r\n\r\n",
    ],
    ids=[
        "5000-digit-length",
        "1e15-length",
        "40-hex-digit-chunk",
        "http2-status-line",
        "status-below-100",
        "garbage",
        "short-body",
        "two-lengths",
        "chunk-size-not-hex",
        "400-kB-header",
    ],
)
def test_a_malformed_or_unbounded_answer_is_a_protocol_failure(
    serve, transport: CurlTransport, answer: bytes
) -> None:
    server = serve([_answer(answer, keep=False)])
    started = time.perf_counter()
    assert _fails(transport, _post(server.url())).kind == "protocol"
    assert time.perf_counter() - started < 2.0


@pytest.mark.parametrize("announced", [True, False], ids=["content-length", "chunked"])
def test_an_over_size_body_is_refused_not_read(
    serve, transport: CurlTransport, announced: bool
) -> None:
    sent = {"bytes": 0}
    size = 30 * 1024 * 1024

    def flood(connection: socket.socket, _request: bytes) -> bool:
        if announced:
            connection.sendall(f"HTTP/1.1 400 Bad\r\nContent-Length: {size}\r\n\r\n".encode())
        else:
            connection.sendall(b"HTTP/1.1 400 Bad\r\nTransfer-Encoding: chunked\r\n\r\n")
        block = b"e" * 65536
        while sent["bytes"] < size:
            piece = block if announced else b"10000\r\n" + block + b"\r\n"
            connection.sendall(piece)
            sent["bytes"] += len(block)
        return False

    server = serve([flood])
    assert _fails(transport, _post(server.url())).kind == "protocol"
    time.sleep(0.2)
    # The client stopped reading at the bound: the server could not push the 30 MB through.
    assert sent["bytes"] < size
    assert MAX_RESPONSE_BYTES == 64 * 1024


def test_endless_interim_answers_end_in_a_failure(serve, transport: CurlTransport) -> None:
    def endless(connection: socket.socket, _request: bytes) -> bool:
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            connection.sendall(b"HTTP/1.1 102 Processing\r\n\r\n" * 100)
        return False

    server = serve([endless])
    started = time.perf_counter()
    assert _fails(transport, _post(server.url(), timeout=1.0)).kind in ("protocol", "timeout")
    assert time.perf_counter() - started < 1.5


def test_a_reused_connection_dropped_unanswered_is_not_posted_again(
    serve, transport: CurlTransport
) -> None:
    # The server read the second request (it may have acted on it) and closed without a word.
    # libcurl's habit is to resend such a request on a fresh connection: for a POST that could
    # deliver a message twice, so the transport refuses to let it.
    server = serve([_answer(OK), _answer(b"", keep=False)])
    assert transport.request(_post(server.url())).status == 200
    assert _fails(transport, _post(server.url())).kind == "protocol"
    assert len(server.requests) == 2


def test_a_redirect_is_answered_not_followed(serve, transport: CurlTransport) -> None:
    server = serve(
        [
            _answer(
                b"HTTP/1.1 307 Moved\r\nLocation: http://127.0.0.1:1/x\r\nContent-Length: 0\r\n\r\n"
            )
        ]
    )
    assert transport.request(_post(server.url())).status == 307
    assert len(server.requests) == 1


def test_a_header_that_would_split_the_request_is_refused_before_sending(
    serve, transport: CurlTransport
) -> None:
    server = serve([])
    failure = _fails(
        transport, _post(server.url(), headers=("Authorization: Bearer a\r\nX-Evil: 1",))
    )
    assert failure.kind == "protocol"
    assert server.requests == []


def test_a_proxy_from_the_environment_carries_the_post(
    serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A loopback forward proxy: it receives the request in absolute form and answers itself.
    proxy = serve([_answer(b"HTTP/1.1 202 Accepted\r\nContent-Length: 0\r\n\r\n")])
    for name in ("no_proxy", "NO_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{proxy.port}")
    engine = CurlTransport(4)
    try:
        answer = engine.request(_post("http://concur.invalid:8080/messages/u/session"))
    finally:
        engine.close()
    assert answer.status == 202
    assert proxy.requests[0].startswith(
        b"POST http://concur.invalid:8080/messages/u/session HTTP/1.1\r\n"
    )


def test_no_proxy_from_the_environment_is_honoured(serve, monkeypatch: pytest.MonkeyPatch) -> None:
    server = serve([])
    monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{free_port()}")  # nothing listens
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    engine = CurlTransport(4)
    try:
        assert engine.request(_post(server.url())).status == 200
    finally:
        engine.close()


def _self_signed(directory: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


def test_https_with_a_verified_certificate_and_keep_alive(serve, tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server = serve([], tls=context)
    trusting = CurlTransport(4, ca_bundle=str(cert))
    try:
        for _ in range(5):
            assert trusting.request(_post(server.url(host="localhost"))).status == 200
        # The name on the certificate is checked too: 127.0.0.1 is not "localhost".
        assert _fails(trusting, _post(server.url(host="127.0.0.1"))).kind == "connect"
    finally:
        trusting.close()
    assert server.connections == 2
    # The default bundle trusts only the public authorities: this certificate is refused.
    default = CurlTransport(4)
    try:
        assert _fails(default, _post(server.url(host="localhost"))).kind == "connect"
    finally:
        default.close()


def test_a_closed_transport_refuses_new_work_and_fails_what_it_held(serve) -> None:
    def hold(connection: socket.socket, _request: bytes) -> bool:
        time.sleep(3)
        return False

    server = serve([hold])
    engine = CurlTransport(4)
    results: queue.SimpleQueue[Answer | ExchangeFailed] = queue.SimpleQueue()
    engine.submit([(_post(server.url()), results.put)])
    time.sleep(0.2)
    engine.close()
    assert isinstance(results.get(timeout=5), ExchangeFailed)
    with pytest.raises(RuntimeError):
        engine.submit([(_post(server.url()), results.put)])


def test_a_failing_completion_callback_does_not_stop_the_engine(
    serve, transport: CurlTransport
) -> None:
    server = serve([])

    def broken(_result: Answer | ExchangeFailed) -> None:
        raise ValueError("a bug in a caller")

    transport.submit([(_post(server.url()), broken)])
    assert transport.request(_post(server.url())).status == 200


def test_answer_reads_only_the_final_answers_headers(serve, transport: CurlTransport) -> None:
    server = serve(
        [
            _answer(
                b"HTTP/1.1 100 Continue\r\nRetry-After: 99\r\n\r\n"
                b"HTTP/1.1 503 Unavailable\r\nRetry-After: 7\r\nTransfer-Encoding: chunked\r\n\r\n"
                b'4\r\n{"er\r\n9\r\nrors":[]}\r\n0\r\n\r\n'
            )
        ]
    )
    answer: Answer = transport.request(_post(server.url()))
    assert (answer.status, answer.headers["retry-after"], answer.body) == (
        503,
        "7",
        b'{"errors":[]}',
    )
