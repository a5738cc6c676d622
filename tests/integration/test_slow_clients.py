"""Slow and greedy clients against a real ``notify api`` over real sockets (issue 23, item 1).

Each attack holds a raw socket open the way an attacker would (silence, a header line at a
time, a body a byte at a time, a huge head, more connections than allowed) while a well-behaved
client is served; the server must close (or answer 408/431/503) within its deadline. The
deadlines are short settings of this test's own process; the assertions leave a wide margin
above them (a loaded machine is slow), and a lower bound shows the deadline itself, not
something else, ended the connection.
"""

from __future__ import annotations

import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.harness import NotifyApi, wait_for

HEADER_TIMEOUT = 1.5
BODY_TIMEOUT = 1.5
KEEP_ALIVE = 1
MAX_HEADER_BYTES = 4096
MARGIN = 3.0  # seconds past a deadline still counted as "in time" on a busy machine
OPERATOR_KEY = "slow-operator-" + uuid.uuid4().hex


def _env(**extra: str) -> dict[str, str]:
    return {
        "NOTIFY_OPERATOR_KEYS": OPERATOR_KEY,
        "NOTIFY_SERVICE_HEADER_TIMEOUT_SECONDS": str(HEADER_TIMEOUT),
        "NOTIFY_SERVICE_BODY_TIMEOUT_SECONDS": str(BODY_TIMEOUT),
        "NOTIFY_SERVICE_KEEP_ALIVE_SECONDS": str(KEEP_ALIVE),
        "NOTIFY_SERVICE_MAX_HEADER_BYTES": str(MAX_HEADER_BYTES),
        **extra,
    }


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NotifyApi]:
    service = NotifyApi(tmp_path_factory.mktemp("slow") / "api.log", _env())
    yield service
    service.stop()


def _connect(api: NotifyApi) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", api.port), timeout=HEADER_TIMEOUT + 10)
    return sock


def _read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    received = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return received
        if not chunk:
            return received
        received += chunk


def _served_meanwhile(api: NotifyApi) -> None:
    # A well-behaved client, on a connection of its own, is answered promptly.
    started = time.monotonic()
    answer = httpx.get(f"{api.url}/healthz", timeout=5)
    assert answer.status_code == 200
    assert time.monotonic() - started < 1.0


class Dripper(threading.Thread):
    """Sends ``pieces`` on ``sock`` one every ``interval`` seconds until one fails."""

    def __init__(self, sock: socket.socket, pieces: list[bytes], interval: float) -> None:
        super().__init__(daemon=True)
        self.sock, self.pieces, self.interval = sock, pieces, interval
        self.sent = 0

    def run(self) -> None:
        for piece in self.pieces:
            try:
                self.sock.sendall(piece)
            except OSError:  # the server closed it
                return
            self.sent += 1
            time.sleep(self.interval)


def test_a_socket_that_sends_nothing_is_closed_at_the_header_deadline(api):
    sock = _connect(api)
    started = time.monotonic()
    _served_meanwhile(api)
    received = _read_until_closed(sock)
    elapsed = time.monotonic() - started
    sock.close()
    assert received == b""  # nothing to answer: just closed
    assert HEADER_TIMEOUT * 0.9 <= elapsed <= HEADER_TIMEOUT + MARGIN, elapsed


def test_a_header_line_every_half_second_is_answered_408_at_the_header_deadline(api):
    sock = _connect(api)
    head = [b"GET /healthz HTTP/1.1\r\nHost: x\r\n"] + [b"X-Slow: yes\r\n"] * 100
    started = time.monotonic()
    dripper = Dripper(sock, head, 0.5)
    dripper.start()
    _served_meanwhile(api)
    received = _read_until_closed(sock)
    elapsed = time.monotonic() - started
    sock.close()
    assert received.startswith(b"HTTP/1.1 408 "), received
    assert HEADER_TIMEOUT * 0.9 <= elapsed <= HEADER_TIMEOUT + MARGIN, elapsed
    assert dripper.sent < 20  # it was cut off, not left to finish


def test_a_login_body_dripped_a_byte_at_a_time_is_answered_408_at_the_body_deadline(api):
    sock = _connect(api)
    sock.sendall(
        b"POST /console/login HTTP/1.1\r\nHost: x\r\n"
        b"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 1000\r\n\r\n"
    )
    started = time.monotonic()
    dripper = Dripper(sock, [b"k"] * 1000, 0.5)
    dripper.start()
    _served_meanwhile(api)
    received = _read_until_closed(sock)
    elapsed = time.monotonic() - started
    sock.close()
    assert received.startswith(b"HTTP/1.1 408 "), received
    assert BODY_TIMEOUT * 0.9 <= elapsed <= BODY_TIMEOUT + MARGIN, elapsed
    assert dripper.sent < 20


def test_an_idle_kept_alive_connection_is_closed_after_the_keep_alive_limit(api):
    sock = _connect(api)
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    answer = b""
    while not answer.endswith(b'{"status":"ok"}'):  # the whole answer, however it is split
        answer += sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 200 "), answer
    started = time.monotonic()
    received = _read_until_closed(sock)
    elapsed = time.monotonic() - started
    sock.close()
    assert received == b""
    assert KEEP_ALIVE * 0.9 <= elapsed <= KEEP_ALIVE + MARGIN, elapsed


def test_a_head_over_the_size_limit_sent_at_once_is_answered_431(api):
    sock = _connect(api)
    big = b"X-Big: " + b"a" * (MAX_HEADER_BYTES + 100) + b"\r\n"
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + big + b"\r\n")
    received = _read_until_closed(sock)
    sock.close()
    assert received.startswith(b"HTTP/1.1 431 "), received
    _served_meanwhile(api)


def test_an_8_mib_header_is_cut_off_early_with_431_and_never_buffered_whole(api):
    sock = _connect(api)
    sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Huge: ")
    sent = 0
    started = time.monotonic()
    try:
        while sent < 8 * 1024 * 1024:
            sock.sendall(b"a" * 8192)
            sent += 8192
            time.sleep(0.001)
    except OSError:  # refused: the server closed the connection
        pass
    received = _read_until_closed(sock)
    sock.close()
    # The server stopped reading after the limit and one read (plus what the kernel buffers):
    # nowhere near 8 MiB, and in no time.
    assert sent < 4 * 1024 * 1024, sent
    assert time.monotonic() - started < 10
    assert received == b"" or received.startswith(b"HTTP/1.1 431 "), received[:200]
    _served_meanwhile(api)


def test_a_well_behaved_client_keeps_being_served_while_every_kind_of_slow_socket_is_open(api):
    silent = _connect(api)
    dripping = _connect(api)
    Dripper(dripping, [b"GET / HTTP/1.1\r\n"] + [b"X: y\r\n"] * 50, 0.3).start()
    with httpx.Client(base_url=api.url, timeout=5) as client:
        for _ in range(10):
            assert client.get("/healthz").status_code == 200
    silent.close()
    dripping.close()


def test_connections_past_the_cap_are_answered_503_at_once_and_served_again_after(
    tmp_path: Path,
):
    cap = 4
    # A long header deadline: the held sockets stay open for the whole test.
    service = NotifyApi(
        tmp_path / "api.log",
        _env(
            NOTIFY_SERVICE_MAX_CONNECTIONS=str(cap),
            NOTIFY_SERVICE_HEADER_TIMEOUT_SECONDS="60",
        ),
    )
    held: list[socket.socket] = []
    try:
        for _ in range(cap):
            held.append(_connect(service))
        # Accepted in the order they connected: the held ones first.
        extra = _connect(service)
        extra.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        started = time.monotonic()
        received = _read_until_closed(extra)
        extra.close()
        assert received.startswith(b"HTTP/1.1 503 "), received
        assert time.monotonic() - started < 2
        for sock in held:
            sock.close()
        held.clear()
        wait_for(
            lambda: httpx.get(f"{service.url}/healthz", timeout=5).status_code == 200,
            timeout=10,
            what="the service to serve again once the held connections closed",
        )
    finally:
        for sock in held:
            sock.close()
        service.stop()


def test_no_slow_client_left_an_error_or_a_traceback_in_the_log(api):
    # Runs after the attacks above (file order): a client cut off mid-body is a 408, not a bug.
    log = api.log()
    assert "Traceback" not in log
    assert '"level": "ERROR"' not in log and " ERROR " not in log
