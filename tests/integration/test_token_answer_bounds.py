"""The token endpoint's answer is bounded like a v4 post's: 64 KiB, one deadline for the whole
exchange (issue 23, item 5).

A small HTTP server on loopback (the standard library's, in a thread) answers token requests
with 1 MiB, or drips a body a byte a second; the real ``TokenEndpoint`` (libcurl transport)
gives up with ``TokenUnavailable`` within its deadline, and says why without any secret.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from worker.concur.oauth import OAuthConfig, TokenEndpoint
from worker.concur.tokens import TokenUnavailable
from worker.concur.transport import MAX_RESPONSE_BYTES

SECRET = "client-secret-" + uuid.uuid4().hex
REFRESH = "refresh-token-" + uuid.uuid4().hex
DEADLINE_SECONDS = 2.0
# Far longer than the deadline: without one deadline for the whole answer, a drip runs this long.
DRIP_SECONDS = 30
ONE_MIB = 1024 * 1024
GRANT = {"access_token": "a" * 40, "expires_in": 3600, "refresh_token": "r" * 40}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    stopping: threading.Event

    def log_message(self, format: str, *args: object) -> None:
        pass  # quiet: the test reads the client's verdict, not the server's log

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", "0")))
        mode = self.path.rsplit("/", 1)[-1]
        if mode == "big":
            # A JSON answer far past the bound, sent as fast as the client reads.
            body = json.dumps({**GRANT, "padding": "x" * ONE_MIB}).encode()
            self._head(len(body))
            self.wfile.write(body)
        elif mode == "big-chunked":
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            chunk = b"x" * 65536
            for _ in range(ONE_MIB // len(chunk)):
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            self.wfile.write(b"0\r\n\r\n")
        elif mode == "drip":
            body = json.dumps(GRANT).encode()
            self._head(len(body))
            for byte in body[:DRIP_SECONDS]:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
                if self.stopping.wait(1.0):
                    return
        else:
            body = json.dumps(GRANT).encode()
            self._head(len(body))
            self.wfile.write(body)

    def _head(self, length: int) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(length))
        self.end_headers()


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # the client hanging up mid-answer is what these tests make it do


@pytest.fixture(scope="module")
def token_server() -> Iterator[str]:
    stopping = threading.Event()
    handler = type("Handler", (_Handler,), {"stopping": stopping})
    server = _Server(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/oauth2/v0/token"
    finally:
        stopping.set()
        server.shutdown()
        server.server_close()


@pytest.fixture
def endpoint() -> Iterator[TokenEndpoint]:
    config = OAuthConfig(
        client_id="client-1",
        client_secret=SECRET,
        connect_timeout_seconds=1.0,
        timeout_seconds=DEADLINE_SECONDS,
        fetch_budget_seconds=4 * DEADLINE_SECONDS,
    )
    token_endpoint = TokenEndpoint(config)
    yield token_endpoint
    token_endpoint.close()


def _grant(endpoint: TokenEndpoint, url: str) -> tuple[float, TokenUnavailable]:
    form = {"grant_type": "refresh_token", "client_secret": SECRET, "refresh_token": REFRESH}
    started = time.monotonic()
    with pytest.raises(TokenUnavailable) as error:
        endpoint.request(url, form, time.monotonic() + endpoint.config.fetch_budget_seconds)
    return time.monotonic() - started, error.value


def test_a_well_formed_answer_from_the_same_server_is_read(endpoint, token_server):
    form = {"grant_type": "refresh_token", "client_secret": SECRET, "refresh_token": REFRESH}
    grant, answered = endpoint.request(f"{token_server}/ok", form, time.monotonic() + 5)
    assert grant.access_token == GRANT["access_token"] and answered.endswith("/ok")


@pytest.mark.parametrize("mode", ["big", "big-chunked"])
def test_a_one_mib_token_answer_is_refused_at_the_64_kib_bound(endpoint, token_server, mode):
    assert ONE_MIB >= 16 * MAX_RESPONSE_BYTES
    elapsed, error = _grant(endpoint, f"{token_server}/{mode}")
    message = str(error)
    assert "more than 64 KiB" in message, message
    assert elapsed < DEADLINE_SECONDS, elapsed  # stopped at the bound, not at the deadline
    assert SECRET not in message and REFRESH not in message


def test_a_dripped_token_answer_fails_within_one_deadline_for_the_whole_exchange(
    endpoint, token_server
):
    elapsed, error = _grant(endpoint, f"{token_server}/drip")
    message = str(error)
    assert "no whole answer within the deadline" in message, message
    # One deadline (2 s) for the exchange, not a per-read timeout that each byte restarts: the
    # drip would take 30 s. The slack covers a loaded machine.
    assert DEADLINE_SECONDS - 0.2 <= elapsed < DEADLINE_SECONDS + 1.5, elapsed
    assert SECRET not in message and REFRESH not in message
