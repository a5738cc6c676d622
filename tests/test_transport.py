"""The pooled transport under ``httpx.Client``: keep-alive, stale connections, TLS, timeouts."""

from __future__ import annotations

import datetime
import http.server
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from worker.redisserver import free_port
from worker.transport import PooledTransport


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Set by a test: close each connection after answering, without saying so in a header, as
    # a server that drops idle keep-alive connections does.
    drop_after_answer = False
    connections = 0  # connections accepted (setup runs once per connection)

    def setup(self) -> None:
        type(self).connections += 1
        super().setup()

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", 0))
        body = self.rfile.read(length)
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("concur-correlationid", "cid-1")
        self.end_headers()
        self.wfile.write(body)
        if type(self).drop_after_answer:
            # An idle timeout of a few milliseconds: the close comes after the answer was read.
            self.wfile.flush()
            time.sleep(0.02)
            self.close_connection = True

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server() -> Iterator[http.server.ThreadingHTTPServer]:
    _Handler.drop_after_answer = False
    _Handler.connections = 0
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def _client(transport: PooledTransport, timeout: float = 5.0) -> httpx.Client:
    return httpx.Client(transport=transport, timeout=timeout)


def test_keep_alive_connections_are_reused(server: http.server.ThreadingHTTPServer) -> None:
    url = f"http://127.0.0.1:{server.server_address[1]}/x"
    with _client(PooledTransport(4)) as client:
        for number in range(20):
            answer = client.post(url, content=f"n{number}".encode())
            assert answer.status_code == 200
            assert answer.content == f"n{number}".encode()
            assert answer.headers["concur-correlationid"] == "cid-1"
    assert _Handler.connections == 1


def test_a_connection_the_server_closed_is_never_used_again(
    server: http.server.ThreadingHTTPServer,
) -> None:
    url = f"http://127.0.0.1:{server.server_address[1]}/x"
    _Handler.drop_after_answer = True
    with _client(PooledTransport(4)) as client:
        for number in range(10):
            # Each answer leaves a pooled connection the server closes while it is idle.
            assert client.post(url, content=b"x").status_code == 200, number
            time.sleep(0.1)
    assert _Handler.connections == 10


def test_refused_connection_is_a_connect_error() -> None:
    with _client(PooledTransport(2)) as client, pytest.raises(httpx.ConnectError):
        client.post(f"http://127.0.0.1:{free_port()}/x", content=b"x")


def test_slow_answer_is_a_read_timeout_and_the_connection_is_not_reused(sandbox, user_id) -> None:
    sandbox.script([{"status": 200, "delayMs": 1500}], user_id=user_id)
    url = f"{sandbox.url}/messages/{user_id}/session"
    body = {"sessionId": "s", "templateId": "t", "context": {}}
    headers = {"Authorization": "Bearer test-secret-token-4f1c"}
    with _client(PooledTransport(2), timeout=0.3) as client:
        with pytest.raises(httpx.ReadTimeout):
            client.post(url, json=body, headers=headers)
        assert client.post(url, json=body, headers=headers).status_code == 200


def test_pool_bound_makes_extra_callers_wait_then_time_out(sandbox, user_id) -> None:
    sandbox.script([{"status": 200, "delayMs": 800}], user_id=user_id)
    url = f"{sandbox.url}/messages/{user_id}/session"
    body = {"sessionId": "s", "templateId": "t", "context": {}}
    headers = {"Authorization": "Bearer test-secret-token-4f1c"}
    transport = PooledTransport(1)
    slow = threading.Thread(
        target=lambda: _client(transport).post(url, json=body, headers=headers), daemon=True
    )
    slow.start()
    with httpx.Client(transport=transport, timeout=httpx.Timeout(5.0, pool=0.2)) as client:
        threading.Event().wait(0.2)
        with pytest.raises(httpx.PoolTimeout):
            client.post(url, json=body, headers=headers)
    slow.join(5)


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


def test_https_with_a_verified_certificate_and_keep_alive(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    _Handler.drop_after_answer = False
    _Handler.connections = 0
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(cert, key)
    httpd.socket = server_context.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        url = f"https://localhost:{httpd.server_address[1]}/x"
        trusting = ssl.create_default_context(cafile=str(cert))
        with _client(PooledTransport(2, ssl_context=trusting)) as client:
            for _ in range(5):
                assert client.post(url, content=b"tls").content == b"tls"
        assert _Handler.connections == 1
        # The default context trusts only the system's authorities: this certificate fails.
        with _client(PooledTransport(2)) as client, pytest.raises(httpx.ConnectError):
            client.post(url, content=b"tls")
    finally:
        httpd.shutdown()
        httpd.server_close()


class _RawServer:
    """Answers each request on a connection with the next canned bytes, then closes if told."""

    def __init__(self, answers: list[bytes], close_after: bool = False) -> None:
        import socket

        self.answers = answers
        self.close_after = close_after
        self.received: list[bytes] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        connection, _ = self.listener.accept()
        with connection:
            for answer in self.answers:
                data = b""
                while b"\r\n\r\n" not in data:
                    data += connection.recv(65536)
                head, _, rest = data.partition(b"\r\n\r\n")
                length = int(
                    next(
                        line.split(b":")[1]
                        for line in head.split(b"\r\n")
                        if line.lower().startswith(b"content-length")
                    )
                )
                while len(rest) < length:
                    rest += connection.recv(65536)
                self.received.append(head + b"\r\n\r\n" + rest)
                connection.sendall(answer)
            if self.close_after:
                connection.shutdown(2)

    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/messages/u/session"


def test_chunked_interim_and_close_delimited_answers_are_read_whole() -> None:
    server = _RawServer(
        [
            # An interim 100 Continue, then a chunked answer with an extension and a trailer.
            b"HTTP/1.1 100 Continue\r\n\r\n"
            b"HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\n"
            b"Retry-After: 7\r\n\r\n"
            b'5;ext=1\r\n{"err\r\n4\r\nors"\r\n4\r\n:[]}\r\n0\r\nX-Trailer: 1\r\n\r\n',
            # No length at all: the body runs to the close, and the connection is not reused.
            b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n{"ok":true}',
        ],
        close_after=True,
    )
    with _client(PooledTransport(2)) as client:
        first = client.post(server.url(), content=b"one")
        assert (first.status_code, first.content) == (503, b'{"errors":[]}')
        assert first.headers["retry-after"] == "7"
        second = client.post(server.url(), content=b"two")
        assert (second.status_code, second.json()) == (200, {"ok": True})
    assert server.received[0].startswith(b"POST /messages/u/session HTTP/1.1\r\n")
    assert server.received[0].endswith(b"\r\n\r\none")


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/2 200 OK\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 2000 OK\r\nContent-Length: 0\r\n\r\n",
        b"garbage\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nabc",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 200 OK\r\n bad header\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n" + b"X: " + b"a" * 70_000 + b"\r\n\r\n",
    ],
    ids=["http2", "status", "garbage", "short-body", "two-lengths", "chunk-size", "header", "long"],
)
def test_a_malformed_answer_is_a_protocol_error(answer: bytes) -> None:
    server = _RawServer([answer], close_after=True)
    with _client(PooledTransport(2)) as client, pytest.raises(httpx.RemoteProtocolError):
        client.post(server.url(), content=b"x")


def test_a_header_that_would_split_the_request_is_refused_before_sending() -> None:
    server = _RawServer([b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"])
    request = httpx.Request(
        "POST", server.url(), headers={"Authorization": "Bearer a\r\nX-Evil: 1"}, content=b"x"
    )
    with pytest.raises(httpx.LocalProtocolError):
        PooledTransport(2).handle_request(request)
    assert server.received == []
