"""The Notifications v4 sandbox, exercised over real loopback HTTP (no mocks)."""

from __future__ import annotations

import hashlib
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from sandbox.concur import Sandbox
from tests.harness import ROOT

TOKEN = "sandbox-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SANDBOX_PY = ROOT / "sandbox" / "concur.py"


def body(template_id: str = "tpl-1", **extra: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "sessionId": "sess-1",
        "templateId": template_id,
        "context": {"url": "https://example.test/x"},
    }
    doc.update(extra)
    return doc


@pytest.fixture
def sandbox() -> Iterator[Sandbox]:
    with Sandbox() as sb:
        yield sb


@pytest.fixture
def client(sandbox: Sandbox) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=sandbox.url, headers=AUTH, timeout=10) as c:
        yield c


def send(client: httpx.Client, user_id: str = "u1", **kwargs: Any) -> httpx.Response:
    kwargs.setdefault("json", body())
    return client.post(f"/messages/{user_id}/session", **kwargs)


def assert_error_message(response: httpx.Response, status: int, count: int = 1) -> list[Any]:
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    errors = response.json()["errors"]
    assert len(errors) == count
    for error in errors:
        assert set(error) == {"errorId", "errorCode", "errorMessage"}
        uuid.UUID(error["errorId"])
        assert error["errorCode"] and error["errorMessage"]
    return list(errors)


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


# -- the contract -----------------------------------------------------------------------------


def test_success_is_200_with_empty_body_and_correlation_id(
    sandbox: Sandbox, client: httpx.Client
) -> None:
    response = send(client)
    assert response.status_code == 200
    assert response.content == b""
    correlation_id = response.headers["concur-correlationid"]
    assert uuid.UUID(correlation_id).version == 4
    [record] = sandbox.requests()
    assert record["status"] == 200
    assert record["correlationId"] == correlation_id
    assert record["userId"] == "u1"
    assert record["templateId"] == "tpl-1"
    assert record["body"] == body()
    assert record["authorized"] is True


def test_every_response_has_a_fresh_correlation_id(client: httpx.Client) -> None:
    ids = {send(client).headers["concur-correlationid"] for _ in range(3)}
    ids.add(send(client, json={}).headers["concur-correlationid"])
    ids.add(client.get("/nope").headers["concur-correlationid"])
    assert len(ids) == 5


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong-token"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": "Bearer"},
        {"Authorization": f"Bearer {TOKEN} extra"},
    ],
    ids=["missing", "wrong-token", "wrong-scheme", "no-token", "malformed"],
)
def test_unauthorized(sandbox: Sandbox, headers: dict[str, str]) -> None:
    with httpx.Client(base_url=sandbox.url, headers=headers) as anonymous:
        response = send(anonymous)
    [error] = assert_error_message(response, 401)
    assert error["errorCode"] == "UNAUTHORIZED"
    [record] = sandbox.requests()
    assert record["authorized"] is False
    assert record["status"] == 401


def test_configured_tokens_replace_the_default(sandbox: Sandbox, client: httpx.Client) -> None:
    sandbox.configure(tokens=["t1", "t2"])
    assert send(client).status_code == 401
    assert send(client, headers={"Authorization": "Bearer t2"}).status_code == 200


def test_non_json_body_is_400(client: httpx.Client) -> None:
    response = send(
        client, json=None, content=b"{not json", headers={"Content-Type": "application/json"}
    )
    [error] = assert_error_message(response, 400)
    assert error["errorCode"] == "INVALID_BODY"
    assert "JSON" in error["errorMessage"]


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ({"templateId": "t", "context": {}}, "sessionId"),
        ({"sessionId": "", "templateId": "t", "context": {}}, "sessionId"),
        ({"sessionId": "s", "templateId": "", "context": {}}, "templateId"),
        ({"sessionId": "s", "templateId": 7, "context": {}}, "templateId"),
        ({"sessionId": "s", "templateId": "t"}, "context"),
        ({"sessionId": "s", "templateId": "t", "context": "x"}, "context"),
        ({"sessionId": "s", "templateId": "t", "context": {"url": 3}}, "context.url"),
        ({"sessionId": "s", "templateId": "t", "context": {}, "extra": 1}, "extra"),
        (["not", "an", "object"], "object"),
    ],
    ids=[
        "missing-sessionId",
        "empty-sessionId",
        "empty-templateId",
        "templateId-not-string",
        "missing-context",
        "context-not-object",
        "url-not-string",
        "extra-key",
        "not-an-object",
    ],
)
def test_schema_violation_is_400_naming_the_field(
    client: httpx.Client, payload: Any, field: str
) -> None:
    [error] = assert_error_message(send(client, json=payload), 400)
    assert error["errorCode"] == "INVALID_BODY"
    assert field in error["errorMessage"]


def test_one_error_per_problem(client: httpx.Client) -> None:
    payload = {"templateId": "", "context": [], "a": 1, "b": 2}
    errors = assert_error_message(send(client, json=payload), 400, count=5)
    messages = " | ".join(e["errorMessage"] for e in errors)
    for field in ("sessionId", "templateId", "context", "a", "b"):
        assert field in messages


def test_url_is_optional(client: httpx.Client) -> None:
    assert (
        send(client, json={"sessionId": "s", "templateId": "t", "context": {}}).status_code == 200
    )


def test_wrong_content_type_is_415(client: httpx.Client) -> None:
    response = send(client, json=None, content=b"{}", headers={"Content-Type": "text/plain"})
    assert_error_message(response, 415)


def test_validation_happens_before_scripts(sandbox: Sandbox, client: httpx.Client) -> None:
    sandbox.script([{"status": 503}])
    assert send(client, json={"sessionId": "s"}).status_code == 400
    assert send(client, headers={"Authorization": "Bearer nope"}).status_code == 401
    assert send(client).status_code == 503  # the scripted answer was not used up by those


@pytest.mark.parametrize(
    "path",
    [
        "/notifications/v4/messages//session",
        "/notifications/v4/messages/u1",
        "/notifications/v4/messages/u1/session/extra",
        "/notifications/v3/messages/u1/session",
        "/",
    ],
)
def test_unknown_path_is_404(sandbox: Sandbox, path: str) -> None:
    response = httpx.post(sandbox.root_url + path, headers=AUTH, json=body())
    [error] = assert_error_message(response, 404)
    assert error["errorCode"] == "NOT_FOUND"


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "PATCH"])
def test_wrong_method_is_405(client: httpx.Client, method: str) -> None:
    response = client.request(method, "/messages/u1/session", json=body())
    [error] = assert_error_message(response, 405)
    assert error["errorCode"] == "METHOD_NOT_ALLOWED"
    assert response.headers["allow"] == "POST"


def test_percent_encoded_user_id_is_decoded(sandbox: Sandbox, client: httpx.Client) -> None:
    assert send(client, user_id="jane%40example.com%2Fx%20y").status_code == 200
    [record] = sandbox.requests(user_id="jane@example.com/x y")
    assert record["path"] == "/notifications/v4/messages/jane%40example.com%2Fx%20y/session"


def test_chunked_body_is_rejected(client: httpx.Client) -> None:
    response = send(client, json=None, content=iter([b'{"sessionId": "s"}']))
    assert response.status_code == 411


def test_oversized_body_is_413(client: httpx.Client) -> None:
    big = body(context={"url": "x" * (70 * 1024)})
    assert send(client, json=big).status_code == 413


def test_oversized_headers_are_413(client: httpx.Client) -> None:
    response = send(client, headers={"X-Padding": "p" * (17 * 1024)})
    assert response.status_code == 413


# -- scripts ----------------------------------------------------------------------------------


def test_script_per_template_then_200(sandbox: Sandbox, client: httpx.Client) -> None:
    sandbox.script([{"status": 503, "retryAfter": "2"}], template_id="welcome")
    first = send(client, json=body("welcome"))
    [error] = assert_error_message(first, 503)
    assert error["errorCode"] == "SERVICE_UNAVAILABLE"
    assert first.headers["retry-after"] == "2"
    assert send(client, json=body("other")).status_code == 200  # not matched, not consumed
    second = send(client, json=body("welcome"))
    assert second.status_code == 200
    assert "retry-after" not in second.headers
    assert [r["status"] for r in sandbox.requests(template_id="welcome")] == [503, 200]


def test_user_script_takes_precedence_over_template_and_default(
    sandbox: Sandbox, client: httpx.Client
) -> None:
    sandbox.script([{"status": 500}], then={"status": 500})
    sandbox.script([{"status": 429}], template_id="welcome")
    sandbox.script([{"status": 409}], user_id="vip", then={"status": 502})
    assert send(client, user_id="vip", json=body("welcome")).status_code == 409
    assert send(client, user_id="vip", json=body("welcome")).status_code == 502
    assert send(client, user_id="u1", json=body("welcome")).status_code == 429
    assert send(client, user_id="u1", json=body("other")).status_code == 500


def test_custom_errors_and_raw_body(sandbox: Sandbox, client: httpx.Client) -> None:
    custom = {"errorCode": "TEMPLATE_NOT_FOUND", "errorMessage": "no such template"}
    sandbox.script(
        [
            {"status": 400, "errors": [custom]},
            {"status": 502, "body": "<html>bad gateway</html>", "contentType": "text/html"},
        ]
    )
    [error] = assert_error_message(send(client), 400)
    assert error["errorCode"] == "TEMPLATE_NOT_FOUND"
    raw = send(client)
    assert (raw.status_code, raw.text) == (502, "<html>bad gateway</html>")
    assert raw.headers["content-type"] == "text/html"


def test_rate_script_is_seeded_and_flaps(sandbox: Sandbox, client: httpx.Client) -> None:
    def run() -> list[int]:
        sandbox.script(rate={"errorRatio": 0.5, "statuses": [500, 503], "seed": 7})
        return [send(client).status_code for _ in range(40)]

    first, second = run(), run()
    assert first == second
    assert set(first) == {200, 500, 503}


def test_invalid_script_is_rejected(sandbox: Sandbox) -> None:
    with pytest.raises(ValueError, match="status"):
        sandbox.script([{"status": "503"}])
    with pytest.raises(ValueError, match="unknown"):
        sandbox.script([{"status": 503, "retry_after": 1}])
    with pytest.raises(ValueError, match="not both"):
        sandbox.script([{"status": 503}], rate={"errorRatio": 0.1})
    response = httpx.post(sandbox.root_url + "/_sandbox/scripts", json={"match": {"x": 1}})
    assert_error_message(response, 400)


def test_delay_causes_client_read_timeout(sandbox: Sandbox, client: httpx.Client) -> None:
    sandbox.script([{"status": 200, "delayMs": 3000}])
    with pytest.raises(httpx.ReadTimeout):
        send(client, timeout=0.3)
    # The sandbox decided (and counted) the answer even though the client gave up.
    assert sandbox.stats()["delivered"] == 1
    assert send(client).status_code == 200  # a new connection is not blocked by the first


def test_hang_holds_until_the_client_disconnects(sandbox: Sandbox) -> None:
    sandbox.script([{"status": 200, "hang": True}])
    with httpx.Client(base_url=sandbox.url, headers=AUTH) as c, pytest.raises(httpx.ReadTimeout):
        send(c, timeout=0.3)
    assert wait_until(lambda: sandbox.stats()["openConnections"] == 0)
    [record] = sandbox.requests()
    assert record["status"] is None
    stats = sandbox.stats()
    assert (stats["hung"], stats["total"], stats["byStatus"]) == (1, 1, {})


def test_drop_closes_the_connection_without_an_answer(sandbox: Sandbox) -> None:
    sandbox.script([{"status": 200, "drop": True}])
    with httpx.Client(base_url=sandbox.url, headers=AUTH) as c:
        with pytest.raises(httpx.RemoteProtocolError):
            send(c)
        assert send(c).status_code == 200  # the script is spent: the next one is answered
    first, second = sandbox.requests()
    assert (first["status"], second["status"]) == (None, 200)
    stats = sandbox.stats()
    assert (stats["dropped"], stats["hung"], stats["byStatus"]) == (1, 0, {"200": 1})


def test_garbled_answers_bytes_that_are_not_http(sandbox: Sandbox) -> None:
    sandbox.script([{"status": 200, "garbled": True}])
    with httpx.Client(base_url=sandbox.url, headers=AUTH) as c:
        with pytest.raises(httpx.RemoteProtocolError):
            send(c)
        assert send(c).status_code == 200
    first, second = sandbox.requests()
    assert (first["status"], second["status"]) == (None, 200)
    stats = sandbox.stats()
    assert (stats["garbled"], stats["dropped"], stats["byStatus"]) == (1, 0, {"200": 1})


def test_stop_releases_hung_and_delayed_requests(caplog: pytest.LogCaptureFixture) -> None:
    sb = Sandbox()
    url = sb.start()
    sb.script([{"status": 200, "hang": True}, {"status": 200, "delayMs": 60_000}])
    clients = [httpx.Client(base_url=url, headers=AUTH, timeout=30) for _ in range(2)]
    with ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(send, c) for c in clients]
        assert wait_until(lambda: sandbox_total(sb) == 2)
        started = time.monotonic()
        sb.stop()
        assert time.monotonic() - started < 10
        for future in futures:
            with pytest.raises(httpx.TransportError):
                future.result(timeout=10)
    for c in clients:
        c.close()
    sb.stop()  # idempotent
    # Requests cut short by stop() are not application errors.
    assert [r.getMessage() for r in caplog.records if r.levelname == "ERROR"] == []


def sandbox_total(sb: Sandbox) -> int:
    return int(sb.stats()["total"])


def test_latency_is_applied(sandbox: Sandbox, client: httpx.Client) -> None:
    sandbox.configure(latency_ms=150)
    started = time.monotonic()
    assert send(client).status_code == 200
    assert time.monotonic() - started >= 0.14  # asyncio may wake a hair early; never much
    sandbox.configure(latency_ms=0)


# -- connections --------------------------------------------------------------------------------


def test_keep_alive_reuses_one_connection(sandbox: Sandbox, client: httpx.Client) -> None:
    for _ in range(50):
        assert send(client).status_code == 200
    assert sandbox.stats()["connections"] == 1
    assert {r["connection"] for r in sandbox.requests()} == {sandbox.requests()[0]["connection"]}


def test_connection_close_is_honoured(sandbox: Sandbox) -> None:
    with httpx.Client(base_url=sandbox.url, headers={**AUTH, "Connection": "close"}) as c:
        for _ in range(3):
            response = send(c)
            assert response.headers["connection"] == "close"
    assert sandbox.stats()["connections"] == 3


def test_raw_http10_and_pipelining(sandbox: Sandbox) -> None:
    payload = b'{"sessionId":"s","templateId":"t","context":{}}'
    request = (
        b"POST /notifications/v4/messages/u1/session HTTP/1.1\r\nHost: x\r\n"
        b"Authorization: Bearer sandbox-token\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload)
    )
    with socket.create_connection(("127.0.0.1", int(sandbox.root_url.rsplit(":", 1)[1]))) as s:
        s.sendall(request * 2 + b"GET /_sandbox/stats HTTP/1.0\r\n\r\n")
        s.settimeout(5)
        data = b""
        while chunk := s.recv(65536):  # HTTP/1.0 without keep-alive: server closes
            data += chunk
    assert data.count(b"HTTP/1.1 200 OK") == 3
    assert b'"delivered": 2' in data


def raw_exchange(sandbox: Sandbox, data: bytes) -> bytes:
    """Send bytes on a fresh connection and read until the sandbox closes it."""
    with socket.create_connection(("127.0.0.1", int(sandbox.root_url.rsplit(":", 1)[1]))) as s:
        s.sendall(data)
        s.settimeout(5)
        received = b""
        while chunk := s.recv(65536):
            received += chunk
    return received


def test_unparseable_request_is_a_json_400_and_a_close(sandbox: Sandbox) -> None:
    answer = raw_exchange(sandbox, b"NOT AN HTTP REQUEST\r\n\r\n")
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ")
    assert b"concur-correlationid: " in head and b"connection: close" in head
    [error] = httpx.Response(400, content=payload).json()["errors"]
    assert error["errorCode"] == "INVALID_BODY"


def test_expect_100_continue_is_answered_before_the_body(sandbox: Sandbox) -> None:
    payload = b'{"sessionId":"s","templateId":"t","context":{}}'
    head = (
        b"POST /notifications/v4/messages/u1/session HTTP/1.1\r\nHost: x\r\n"
        b"Authorization: Bearer sandbox-token\r\nContent-Type: application/json\r\n"
        b"Expect: 100-continue\r\nConnection: close\r\n"
        b"Content-Length: %d\r\n\r\n" % len(payload)
    )
    with socket.create_connection(("127.0.0.1", int(sandbox.root_url.rsplit(":", 1)[1]))) as s:
        s.settimeout(5)
        s.sendall(head)
        assert s.recv(65536).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        s.sendall(payload)
        assert s.recv(65536).startswith(b"HTTP/1.1 200 OK\r\n")
    assert sandbox.stats()["delivered"] == 1


# -- control plane ------------------------------------------------------------------------------


def test_requests_never_contain_the_raw_token(sandbox: Sandbox, client: httpx.Client) -> None:
    secret = "s3cr3t-" + uuid.uuid4().hex
    sandbox.configure(tokens=[secret])
    send(client, headers={"Authorization": f"Bearer {secret}"})
    send(client)  # a rejected token is not stored either
    over_http = httpx.get(sandbox.root_url + "/_sandbox/requests").text
    assert secret not in over_http and TOKEN not in over_http
    assert secret not in repr(sandbox.requests())
    assert secret not in httpx.get(sandbox.root_url + "/_sandbox/config").text
    first, second = sandbox.requests()
    assert first["tokenSha256"] == hashlib.sha256(secret.encode()).hexdigest()[:12]
    assert (first["authorized"], second["authorized"]) == (True, False)


def test_reset_clears_scripts_records_and_stats_but_keeps_config(
    sandbox: Sandbox, client: httpx.Client
) -> None:
    sandbox.configure(tokens=[TOKEN, "other"])
    sandbox.script([{"status": 503}], then={"status": 503})
    assert send(client).status_code == 503
    sandbox.reset()
    assert sandbox.requests() == []
    assert sandbox.stats()["total"] == 0
    assert send(client, headers={"Authorization": "Bearer other"}).status_code == 200
    assert httpx.post(sandbox.root_url + "/_sandbox/reset").json() == {"reset": True}
    assert sandbox.stats()["total"] == 0


def test_stats_per_second(sandbox: Sandbox, client: httpx.Client) -> None:
    before = int(time.time())
    for _ in range(5):
        send(client)
    send(client, json={})
    after = int(time.time())
    stats = sandbox.stats()
    assert stats["total"] == 6
    assert stats["byStatus"] == {"200": 5, "400": 1}
    assert stats["delivered"] == 5
    assert sum(stats["perSecond"].values()) == 5
    assert all(before <= int(second) <= after for second in stats["perSecond"])
    assert stats["maxPerSecond"] == max(stats["perSecond"].values())


def test_control_endpoints_match_the_in_process_api(sandbox: Sandbox, client: httpx.Client) -> None:
    control = httpx.Client(base_url=sandbox.root_url + "/_sandbox")
    script = {"match": {"templateId": "welcome"}, "responses": [{"status": 503}]}
    assert control.post("/scripts", json=script).status_code == 201
    assert send(client, json=body("welcome")).status_code == 503
    assert control.delete("/scripts").json() == {"cleared": 1}
    control.post("/scripts", json={"match": {}, "responses": [{"status": 429}]})
    assert send(client, user_id="u2").status_code == 429
    send(client, user_id="u2", json=body("welcome"))

    assert control.get("/requests").json() == {"requests": sandbox.requests()}
    assert control.get("/requests", params={"userId": "u2", "templateId": "welcome"}).json() == {
        "requests": sandbox.requests(user_id="u2", template_id="welcome")
    }
    assert len(sandbox.requests(user_id="u2", template_id="welcome")) == 1
    assert control.get("/stats").json() == sandbox.stats()

    config = control.post("/config", json={"latencyMs": 1, "tokens": ["a", "b"]})
    assert config.status_code == 200
    assert config.json()["latencyMs"] == 1
    assert len(config.json()["tokenSha256"]) == 2
    assert send(client).status_code == 401
    assert send(client, headers={"Authorization": "Bearer b"}).status_code == 200
    assert control.post("/config", json={"latencyMs": -1}).status_code == 400
    assert control.get("/config").json() == config.json()

    not_allowed = control.get("/scripts")
    assert_error_message(not_allowed, 405)
    assert set(not_allowed.headers["allow"].split(", ")) == {"POST", "DELETE"}
    assert_error_message(control.get("/nope"), 404)
    assert control.get("/stats/").json() == sandbox.stats()  # a trailing slash is the same path
    control.close()


def test_max_records_bounds_the_record_but_not_the_stats() -> None:
    with Sandbox(max_records=5) as sb, httpx.Client(base_url=sb.url, headers=AUTH) as c:
        for _ in range(8):
            send(c)
        assert [r["seq"] for r in sb.requests()] == [4, 5, 6, 7, 8]
        assert sb.stats()["delivered"] == 8


def test_throughput_smoke() -> None:
    limits = httpx.Limits(max_connections=50, max_keepalive_connections=50)
    with (
        Sandbox(latency_ms=20) as sb,
        httpx.Client(base_url=sb.url, headers=AUTH, limits=limits, timeout=30) as c,
        ThreadPoolExecutor(50) as pool,
    ):
        statuses = list(pool.map(lambda i: send(c, user_id=f"u{i}").status_code, range(500)))
        assert statuses == [200] * 500
        stats = sb.stats()
        assert stats["delivered"] == 500
        assert stats["connections"] <= 50


def test_cli_serves_and_exits_cleanly_on_sigterm() -> None:
    proc = subprocess.Popen(
        [sys.executable, str(SANDBOX_PY), "--port", "0", "--token", "cli-a", "--token", "cli-b"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        assert line.startswith("sandbox listening on http://127.0.0.1:")
        url = line.rsplit(" ", 1)[1]
        assert url.endswith("/notifications/v4")
        ok = httpx.post(
            f"{url}/messages/u1/session", headers={"Authorization": "Bearer cli-b"}, json=body()
        )
        assert ok.status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def test_start_twice_and_urls(sandbox: Sandbox) -> None:
    assert sandbox.start() == sandbox.url
    assert sandbox.url == sandbox.root_url + "/notifications/v4"
    with pytest.raises(RuntimeError):
        _ = Sandbox().url


def test_start_fails_loudly_when_the_port_is_taken(sandbox: Sandbox) -> None:
    port = int(sandbox.root_url.rsplit(":", 1)[1])
    with pytest.raises(RuntimeError, match="failed to start"):
        Sandbox(port=port).start()
