"""The OpenAPI document against the live app, answer by answer.

Every documented answer (operation, status, media type) is got from a real request to the app
over loopback, and its body validates against the schema the document gives for it (JSON with
jsonschema; XML element by element against the same schema's properties). The limits the
document states are the ones the app enforces. The check itself is shown to refuse a body that
does not fit, so a green run means something.
"""

from __future__ import annotations

import http.client
import socket
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from cryptography.fernet import Fernet
from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError
from openapi_spec_validator import validate as validate_openapi

from sandbox.concur import Sandbox
from tests import harness
from tests.harness import (
    MAX_BODY,
    OPERATOR,
    PARTNER,
    ServerThread,
    dead_letter,
    free_port,
    request_body,
)
from worker.front.api import create_app
from worker.front.notifications import XSI_NAMESPACE
from worker.runtime import Runtime
from worker.shapes.contract import MAX_BATCH_MESSAGES, MAX_PAGE_LIMIT
from worker.shapes.models import (
    BARE_KEY_PARTNER,
    MAX_ID_LENGTH,
    MESSAGE_ID_PATTERN,
    Message,
    schema_pattern,
)

NIL = f"{{{XSI_NAMESPACE}}}nil"
XML_ACCEPT = {**OPERATOR, "Accept": "application/xml"}
JSON_ACCEPT = {**OPERATOR, "Accept": "application/json"}
WRONG_KEY = {"Authorization": "Bearer wrong-key-" + uuid.uuid4().hex}

Answer = tuple[str, str, httpx.Response]  # (method, path template, the answer)


@pytest.fixture(scope="module")
def concur() -> Iterator[Sandbox]:
    """A sandbox of this module's own, whose token endpoint connects the companies."""
    with Sandbox(tokens=[f"static-{uuid.uuid4().hex}"]) as sandbox:
        yield sandbox


@pytest.fixture(scope="module")
def app_settings(concur: Sandbox) -> Any:
    """The app's OAuth client (and no company of its own), so PUT /companies can connect one;
    the conftest's ``server`` serves it."""
    return harness.app_settings(
        oauth_client_id=f"app-{uuid.uuid4().hex[:8]}",
        oauth_client_secret="sandbox-client-secret",
        oauth_token_url=f"{concur.root_url}/oauth2/v0/token",
        token_encryption_key=Fernet.generate_key().decode(),
        partner_companies="gateway=*",  # PARTNER's bare key may name any registry company
    )


@pytest.fixture(scope="module")
def document(server: ServerThread) -> dict[str, Any]:
    return httpx.get(f"{server.url}/openapi.json", timeout=30).json()


def _media(response: httpx.Response) -> str:
    return response.headers.get("content-type", "").partition(";")[0].strip()


def _documented(
    document: dict[str, Any], method: str, template: str, response: httpx.Response
) -> dict[str, Any]:
    operation = document["paths"][template][method.lower()]
    responses = operation["responses"]
    assert str(response.status_code) in responses, (
        f"{method} {template}: {response.status_code} is not documented ({sorted(responses)})"
    )
    documented: dict[str, Any] = responses[str(response.status_code)]
    return documented


def _json_validator(document: dict[str, Any], schema: dict[str, Any]) -> Draft202012Validator:
    # The documented schema with the document's components beside it, so that its
    # "#/components/schemas/..." references resolve against the same root.
    root = {**schema, "components": document["components"]}
    return Draft202012Validator(root, format_checker=Draft202012Validator.FORMAT_CHECKER)


def _resolve(document: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        schema = document["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    return schema


def _variants(document: dict[str, Any], schema: dict[str, Any]) -> list[dict[str, Any]]:
    schema = _resolve(document, schema)
    return [_resolve(document, each) for each in schema.get("anyOf", [schema])]


def _check_xml(document: dict[str, Any], element: ET.Element, schema: dict[str, Any]) -> None:
    """``element`` against a JSON Schema as the document's ``xml`` hints lay it out: an object's
    properties are child elements in order, an array's items are children, a null is i:nil."""
    variants = _variants(document, schema)
    if element.get(NIL) == "true":
        assert {"type": "null"} in variants, f"<{element.tag}> is nil, its schema has no null"
        return
    [kind] = [v for v in variants if v != {"type": "null"}]
    local = element.tag.rpartition("}")[2]
    if kind.get("type") == "object":
        names = [child.tag.rpartition("}")[2] for child in element]
        assert names == list(kind["properties"]), f"<{local}> children {names}"
        for child, name in zip(element, kind["properties"], strict=True):
            _check_xml(document, child, kind["properties"][name])
    elif kind.get("type") == "array":
        # An item's element is named by its xml hint, else by its schema's name.
        items = kind["items"]
        item_name = (
            _resolve(document, items).get("xml", {}).get("name")
            or items.get("$ref", "").rpartition("/")[2]
        )
        for child in element:
            assert child.tag.rpartition("}")[2] == item_name, f"<{local}> holds <{child.tag}>"
            _check_xml(document, child, kind["items"])
    elif kind.get("type") == "integer":
        int(element.text or "")
    else:
        assert kind.get("type") == "string", f"<{local}>: {kind}"


def check_answer(
    document: dict[str, Any], method: str, template: str, response: httpx.Response
) -> None:
    """Raise unless ``response`` is what the document says ``method template`` answers."""
    documented = _documented(document, method, template, response)
    for name, header in documented.get("headers", {}).items():
        assert name in response.headers or not header.get("required"), f"no {name} header"
    content = documented.get("content")
    if content is None:
        assert not response.content, f"{method} {template}: a body where none is documented"
        return
    media = _media(response)
    assert media in content, f"{method} {template}: {media} is not documented ({list(content)})"
    schema = content[media]["schema"]
    if media == "application/json":
        _json_validator(document, schema).validate(response.json())
    elif media == "application/xml":
        root = ET.fromstring(response.content)
        hint = _resolve(document, schema)["xml"]
        assert root.tag == f"{{{hint['namespace']}}}{hint['name']}", root.tag
        _check_xml(document, root, schema)
    else:
        _json_validator(document, schema).validate(response.text)


# -- the answers ---------------------------------------------------------------------------------


def _answers(http: httpx.Client, runtime: Runtime, concur: Sandbox) -> Iterator[Answer]:
    """A live answer for each documented (operation, status, media type) but the 503s."""
    user = f"user-{uuid.uuid4().hex[:12]}"
    send = f"/messages/{user}/session"
    template = "/messages/{userId}/session"
    queued = http.post(send, json=request_body(), headers=PARTNER)
    yield "POST", template, queued
    yield "POST", template, http.post(send, json=request_body(session="again"), headers=PARTNER)
    yield "POST", template, http.post(send, json=request_body(session="again"), headers=PARTNER)
    yield "POST", template, http.post(send, json={"sessionId": 5}, headers=PARTNER)
    keyed = {**PARTNER, "Idempotency-Key": f"k-{uuid.uuid4()}"}
    yield "POST", template, http.post(send, json=request_body(), headers=keyed)
    yield "POST", template, http.post(send, json=request_body(), headers=keyed)  # 409
    unknown = {**PARTNER, "Concur-Company-Id": str(uuid.uuid4())}
    yield "POST", template, http.post(send, json=request_body(), headers=unknown)
    not_one = {**PARTNER, "Concur-Company-Id": "ACME"}
    yield "POST", template, http.post(send, json=request_body(), headers=not_one)
    yield "POST", template, http.post(send, json=request_body())
    yield "POST", template, http.post(send, json=request_body(), headers=OPERATOR)
    big = b'{"x": "' + b"a" * MAX_BODY + b'"}'
    json_type = {"Content-Type": "application/json"}
    yield "POST", template, http.post(send, content=big, headers={**PARTNER, **json_type})
    yield (
        "POST",
        template,
        http.post(send, content=b"{}", headers={**PARTNER, "Content-Type": "text/plain"}),
    )

    yield from _batch_answers(http, user)

    message = "/messages/{id}"
    yield "GET", message, http.get(f"/messages/{queued.json()['id']}", headers=PARTNER)
    letter = dead_letter(runtime, user)
    yield "GET", message, http.get(f"/messages/{letter}", headers=OPERATOR)
    yield "GET", message, http.get("/messages/nosuchmessage", headers=PARTNER)
    yield "GET", message, http.get("/messages/nosuchmessage")
    # Recorded without a task: nothing takes it before it is cancelled (the mover's grace).
    waiting = Message.create(user, "s-cancel", "welcome", partner=BARE_KEY_PARTNER)
    runtime.store.create(waiting.id, waiting.to_wire())
    yield "DELETE", message, http.delete(f"/messages/{waiting.id}", headers=PARTNER)
    yield "DELETE", message, http.delete(f"/messages/{letter}", headers=OPERATOR)  # 409
    yield "DELETE", message, http.delete("/messages/nosuchmessage", headers=PARTNER)
    yield "DELETE", message, http.delete(f"/messages/{waiting.id}")

    listed = "/notifications"
    mine = {"status": "failed", "user": user}
    yield "GET", listed, http.get(listed, params=mine, headers=JSON_ACCEPT)
    yield "GET", listed, http.get(listed, params=mine, headers=XML_ACCEPT)
    yield "GET", listed, http.get(listed, params={**mine, "limit": "1"}, headers=OPERATOR)
    yield "GET", listed, http.get(listed, params={"status": "pending"}, headers=OPERATOR)
    yield "GET", listed, http.get(listed, params=mine, headers={**OPERATOR, "Accept": "text/html"})
    yield "GET", listed, http.get(listed, params=mine)
    yield "GET", listed, http.get(listed, params=mine, headers=PARTNER)

    one = "/notifications/{id}"
    yield "GET", one, http.get(f"/notifications/{letter}", headers=JSON_ACCEPT)
    yield "GET", one, http.get(f"/notifications/{letter}", headers=XML_ACCEPT)
    yield "GET", one, http.get("/notifications/nosuchletter", headers=OPERATOR)
    yield "GET", one, http.get(f"/notifications/{letter}", headers={**OPERATOR, "Accept": "x/y"})
    yield "GET", one, http.get(f"/notifications/{letter}")
    yield "GET", one, http.get(f"/notifications/{letter}", headers=PARTNER)

    bulk = "/notifications/replay"
    yield "POST", bulk, http.post(bulk, params={**mine, "dryRun": "true"}, headers=OPERATOR)
    yield "POST", bulk, http.post(bulk, params={**mine, "rate": "50"}, headers=OPERATOR)
    yield "POST", bulk, http.post(bulk, params=mine, headers=OPERATOR)
    yield "POST", bulk, http.post(bulk, params={"rate": "0"}, headers=OPERATOR)
    yield "POST", bulk, http.post(bulk, params=mine)
    yield "POST", bulk, http.post(bulk, params=mine, headers=PARTNER)

    replay = "/notifications/{id}/replay"
    again = dead_letter(runtime, user)
    yield "POST", replay, http.post(f"/notifications/{again}/replay", headers=OPERATOR)
    yield "POST", replay, http.post("/notifications/nosuchletter/replay", headers=OPERATOR)
    yield "POST", replay, http.post(f"/notifications/{again}/replay")
    yield "POST", replay, http.post(f"/notifications/{again}/replay", headers=PARTNER)

    gone = dead_letter(runtime, user)
    yield "DELETE", one, http.delete(f"/notifications/{gone}", headers=OPERATOR)
    yield "DELETE", one, http.delete(f"/notifications/{gone}", headers=OPERATOR)
    yield "DELETE", one, http.delete(f"/notifications/{gone}")
    yield "DELETE", one, http.delete(f"/notifications/{gone}", headers=PARTNER)

    yield from _company_answers(http, concur)
    yield from _webhook_answers(http)

    for path in ("/healthz", "/readyz", "/metrics", "/openapi.json"):
        yield "GET", path, http.get(path)
    yield "GET", "/metrics", http.get("/metrics", headers=WRONG_KEY)
    yield "GET", "/metrics", http.get("/metrics", headers=PARTNER)


def _batch_answers(http: httpx.Client, user: str) -> Iterator[Answer]:
    """A live answer for each documented answer of ``POST /messages/batch`` but the 408, the
    429 (``_locked``) and the 503 (``_unavailable``)."""
    batch = "/messages/batch"
    item = {"userId": user, **request_body()}
    refused = {"userId": user, **request_body(), "templateId": "evil"}
    yield "POST", batch, http.post(batch, json=[item], headers=PARTNER)
    yield "POST", batch, http.post(batch, json=[item, refused, 7], headers=PARTNER)
    yield "POST", batch, http.post(batch, json={"not": "an array"}, headers=PARTNER)
    yield "POST", batch, http.post(batch, json=[item] * (MAX_BATCH_MESSAGES + 1), headers=PARTNER)
    unknown = {**PARTNER, "Concur-Company-Id": str(uuid.uuid4())}
    yield "POST", batch, http.post(batch, json=[item], headers=unknown)
    yield "POST", batch, http.post(batch, json=[item])
    yield "POST", batch, http.post(batch, json=[item], headers=OPERATOR)
    plain = {**PARTNER, "Content-Type": "text/plain"}
    yield "POST", batch, http.post(batch, content=b"[]", headers=plain)


def _raw_answer(url: str, head: bytes, body_start: bytes) -> httpx.Response:
    """Send a request head and the start of its body, and read the answer (to a body that
    never finishes)."""
    host, _, port = url.removeprefix("http://").partition(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(head + body_start)
        answer = http.client.HTTPResponse(sock)
        answer.begin()
        return httpx.Response(answer.status, headers=answer.getheaders(), content=answer.read())


def _locked(locked: httpx.Client) -> Iterator[Answer]:
    """A body too slow (408), then, once wrong keys passed the failure limit, every keyed
    operation's 429 (the app allows one wrong key per address)."""
    head = (
        b"POST /messages/u-slow/session HTTP/1.1\r\nHost: x\r\n"
        + f"Authorization: Bearer {PARTNER['Authorization'].split()[1]}\r\n".encode()
        + b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
    )
    slow = _raw_answer(str(locked.base_url).rstrip("/"), head, b'{"')
    yield "POST", "/messages/{userId}/session", slow
    batch_head = head.replace(b"/messages/u-slow/session", b"/messages/batch")
    yield "POST", "/messages/batch", _raw_answer(str(locked.base_url).rstrip("/"), batch_head, b"[")
    for _ in range(2):
        locked.get("/metrics", headers=WRONG_KEY)
    for method, template, path in (
        ("POST", "/messages/{userId}/session", "/messages/u-1/session"),
        ("POST", "/messages/batch", "/messages/batch"),
        ("GET", "/messages/{id}", "/messages/abc"),
        ("DELETE", "/messages/{id}", "/messages/abc"),
        ("GET", "/notifications", "/notifications?status=failed"),
        ("POST", "/notifications/replay", "/notifications/replay"),
        ("GET", "/notifications/{id}", "/notifications/abc"),
        ("DELETE", "/notifications/{id}", "/notifications/abc"),
        ("POST", "/notifications/{id}/replay", "/notifications/abc/replay"),
        ("GET", "/metrics", "/metrics"),
        ("GET", "/companies", "/companies"),
        ("GET", "/companies/{companyId}", "/companies/default"),
        ("PUT", "/companies/{companyId}", f"/companies/{uuid.uuid4()}"),
        ("DELETE", "/companies/{companyId}", f"/companies/{uuid.uuid4()}"),
        *_WEBHOOK_CALLS,
    ):
        yield method, template, locked.request(method, path, headers=WRONG_KEY)


def _company_answers(http: httpx.Client, concur: Sandbox) -> Iterator[Answer]:
    """A live answer for each documented answer of the /companies operations but the 503s."""
    company = str(uuid.uuid4())
    request_token = f"request-{uuid.uuid4().hex}"
    concur.configure_oauth(company_id=company, auth_token=request_token)
    one, listed = "/companies/{companyId}", "/companies"
    path = f"/companies/{company}"
    yield "PUT", one, http.put(path, json={"requestToken": request_token}, headers=OPERATOR)
    yield "PUT", one, http.put(path, json={"requestToken": "wrong"}, headers=OPERATOR)
    yield "PUT", one, http.put(path, json={}, headers=OPERATOR)
    big = b'{"requestToken": "' + b"a" * MAX_BODY + b'"}'
    json_type = {"Content-Type": "application/json"}
    yield "PUT", one, http.put(path, content=big, headers={**OPERATOR, **json_type})
    plain = {**OPERATOR, "Content-Type": "text/plain"}
    yield "PUT", one, http.put(path, content=b"{}", headers=plain)
    yield "PUT", one, http.put(path, json={"requestToken": request_token})
    yield "PUT", one, http.put(path, json={"requestToken": request_token}, headers=PARTNER)
    for headers in (OPERATOR, {}, PARTNER):
        yield "GET", listed, http.get(listed, headers=headers)
        yield "GET", one, http.get(path, headers=headers)
    yield "GET", one, http.get("/companies/ACME", headers=OPERATOR)
    yield "GET", one, http.get(f"/companies/{uuid.uuid4()}", headers=OPERATOR)
    yield "DELETE", one, http.delete(path, headers=OPERATOR)
    yield "DELETE", one, http.delete("/companies/default", headers=OPERATOR)
    yield "DELETE", one, http.delete(f"/companies/{uuid.uuid4()}", headers=OPERATOR)
    yield "DELETE", one, http.delete(path)
    yield "DELETE", one, http.delete(path, headers=PARTNER)


_HOOK = "/partners/{partner}/webhook"
_WEBHOOK_CALLS = (
    ("GET", _HOOK, "/partners/acme/webhook"),
    ("PUT", _HOOK, "/partners/acme/webhook"),
    ("DELETE", _HOOK, "/partners/acme/webhook"),
    ("POST", _HOOK + "/rotate", "/partners/acme/webhook/rotate"),
    ("POST", _HOOK + "/test", "/partners/acme/webhook/test"),
    ("GET", "/webhooks/failed", "/webhooks/failed"),
)


def _webhook_answers(http: httpx.Client) -> Iterator[Answer]:
    """A live answer for each documented answer of the webhook operations but the 503s."""
    partner = f"p-{uuid.uuid4().hex[:8]}"
    path = f"/partners/{partner}/webhook"
    hook = {"url": "https://hooks.example.com/in", "events": ["message.failed"]}
    yield "PUT", _HOOK, http.put(path, json=hook, headers=OPERATOR)
    yield "PUT", _HOOK, http.put(path, json={"url": "http://hooks.example.com/"}, headers=OPERATOR)
    big = b'{"url": "' + b"a" * MAX_BODY + b'"}'
    json_type = {"Content-Type": "application/json"}
    yield "PUT", _HOOK, http.put(path, content=big, headers={**OPERATOR, **json_type})
    plain = {**OPERATOR, "Content-Type": "text/plain"}
    yield "PUT", _HOOK, http.put(path, content=b"{}", headers=plain)
    for method, template, _ in _WEBHOOK_CALLS:
        real = template.replace("{partner}", partner)
        body = hook if method == "PUT" else None
        yield method, template, http.request(method, real, json=body)
        yield method, template, http.request(method, real, json=body, headers=PARTNER)
    yield "GET", _HOOK, http.get(path, headers=OPERATOR)
    yield "GET", _HOOK, http.get("/partners/ACME/webhook", headers=OPERATOR)
    yield "POST", _HOOK + "/rotate", http.post(path + "/rotate", headers=OPERATOR)
    yield "POST", _HOOK + "/rotate", http.post("/partners/ACME/webhook/rotate", headers=OPERATOR)
    yield "POST", _HOOK + "/test", http.post(path + "/test", headers=OPERATOR)
    yield "POST", _HOOK + "/test", http.post("/partners/ACME/webhook/test", headers=OPERATOR)
    yield "GET", "/webhooks/failed", http.get("/webhooks/failed", headers=OPERATOR)
    failed = http.get("/webhooks/failed", params={"limit": "0"}, headers=OPERATOR)
    yield "GET", "/webhooks/failed", failed
    yield "DELETE", _HOOK, http.delete(path, headers=OPERATOR)
    yield "DELETE", _HOOK, http.delete("/partners/ACME/webhook", headers=OPERATOR)
    yield "DELETE", _HOOK, http.delete(path, headers=OPERATOR)
    for template in (_HOOK, _HOOK + "/rotate", _HOOK + "/test"):
        method = "GET" if template == _HOOK else "POST"
        yield (
            method,
            template,
            http.request(method, template.replace("{partner}", partner), headers=OPERATOR),
        )


def _unavailable(down: httpx.Client) -> list[Answer]:
    """Every operation of an app whose Redis does not answer (503 where one is documented).

    Sent at once: each waits out the HTTP service's Redis patience (about 2 s) before it
    answers.
    """
    sent = [
        ("POST", "/messages/{userId}/session", "/messages/u-1/session", PARTNER),
        ("POST", "/messages/batch", "/messages/batch", PARTNER),
        ("GET", "/messages/{id}", "/messages/abc", PARTNER),
        ("DELETE", "/messages/{id}", "/messages/abc", PARTNER),
        ("GET", "/notifications", "/notifications?status=failed", OPERATOR),
        ("POST", "/notifications/replay", "/notifications/replay", OPERATOR),
        ("GET", "/notifications/{id}", "/notifications/abc", OPERATOR),
        ("DELETE", "/notifications/{id}", "/notifications/abc", OPERATOR),
        ("POST", "/notifications/{id}/replay", "/notifications/abc/replay", OPERATOR),
        ("GET", "/companies", "/companies", OPERATOR),
        ("GET", "/companies/{companyId}", f"/companies/{uuid.uuid4()}", OPERATOR),
        ("PUT", "/companies/{companyId}", f"/companies/{uuid.uuid4()}", OPERATOR),
        ("DELETE", "/companies/{companyId}", f"/companies/{uuid.uuid4()}", OPERATOR),
        *((method, template, path, OPERATOR) for method, template, path in _WEBHOOK_CALLS),
        ("GET", "/healthz", "/healthz", {}),
        ("GET", "/readyz", "/readyz", {}),
        ("GET", "/metrics", "/metrics", {}),
        ("GET", "/openapi.json", "/openapi.json", {}),
    ]

    def send(method: str, path: str, headers: dict[str, str]) -> httpx.Response:
        body: Any = request_body() if path.endswith("/session") else None
        if path.endswith("/batch"):
            body = [{"userId": "u-1", **request_body()}]
        if method == "PUT":
            body = {"url": "https://a.example"} if "webhook" in path else {"requestToken": "r"}
        return down.request(method, path, json=body, headers=headers)

    with ThreadPoolExecutor(len(sent)) as pool:
        answers = [pool.submit(send, method, path, headers) for method, _, path, headers in sent]
        return [(m, t, answer.result()) for (m, t, _, _), answer in zip(sent, answers, strict=True)]


@pytest.fixture(scope="module")
def answers(server: ServerThread, runtime: Runtime, concur: Sandbox) -> list[Answer]:
    dead = harness.app_settings(redis_url=f"redis://127.0.0.1:{free_port()}/0")
    strict = harness.app_settings(auth_failures_per_address=1, service_body_timeout_seconds=0.5)
    with (
        ServerThread(create_app(dead)) as unavailable,  # its own runtime, patient for 2 s
        ServerThread(create_app(strict, runtime)) as strict_server,
        httpx.Client(base_url=server.url, timeout=30) as http,
        httpx.Client(base_url=unavailable.url, timeout=60) as down,
        httpx.Client(base_url=strict_server.url, timeout=30) as locked,
    ):
        return [*_answers(http, runtime, concur), *_unavailable(down), *_locked(locked)]


def test_the_document_is_valid_openapi_and_every_schema_valid_json_schema(document):
    validate_openapi(document)
    for schema in document["components"]["schemas"].values():
        Draft202012Validator.check_schema(schema)


def test_every_live_answer_is_documented_and_fits_its_schema(document, answers):
    failures = []
    for method, template, response in answers:
        try:
            check_answer(document, method, template, response)
        except (AssertionError, ValidationError, ValueError) as error:
            failures.append(f"{method} {template} -> {response.status_code}: {error}")
    assert not failures, "\n".join(failures)


def test_every_documented_answer_is_provoked(document, answers):
    provoked = {
        (method.lower(), template, response.status_code, _media(response))
        for method, template, response in answers
    }
    missing = []
    for template, operations in document["paths"].items():
        for method, operation in operations.items():
            for status, documented in operation["responses"].items():
                for media in documented.get("content", {"": None}):
                    if (method, template, int(status), media) not in provoked:
                        missing.append(f"{method.upper()} {template} {status} {media}".strip())
    assert not missing, "documented but never answered here:\n" + "\n".join(missing)


@pytest.mark.parametrize(
    ("template", "status", "body"),
    [
        ("/messages/{userId}/session", 202, {"id": "a", "status": "sent", "duplicate": False}),
        ("/messages/{userId}/session", 202, {"id": "a b", "status": "queued", "duplicate": False}),
        ("/messages/{userId}/session", 400, {"errors": []}),
        ("/messages/{userId}/session", 400, {"errors": [{"errorCode": "X"}]}),
        ("/healthz", 200, {"status": "ok", "extra": 1}),
    ],
)
def test_the_check_refuses_an_answer_that_does_not_fit(document, template, status, body):
    method = "GET" if template == "/healthz" else "POST"
    response = httpx.Response(status, json=body, headers={"Location": "/messages/a"})
    with pytest.raises(ValidationError):
        check_answer(document, method, template, response)
    with pytest.raises(AssertionError, match="not documented"):
        check_answer(document, method, template, httpx.Response(418, json=body))


def test_the_limits_the_document_states_are_the_ones_enforced(document, server):
    request = document["components"]["schemas"]["NotificationsPartnerRequestBody"]
    assert request["properties"]["sessionId"]["maxLength"] == MAX_ID_LENGTH
    parameters = {
        (p["name"], template): p["schema"]
        for template, operations in document["paths"].items()
        for operation in operations.values()
        for p in operation.get("parameters", [])
    }
    assert parameters["id", "/messages/{id}"]["pattern"] == schema_pattern(MESSAGE_ID_PATTERN)
    assert parameters["limit", "/notifications"]["maximum"] == MAX_PAGE_LIMIT
    with httpx.Client(base_url=server.url, timeout=30) as http:
        user = f"user-{uuid.uuid4().hex[:12]}"
        send = f"/messages/{user}/session"
        longest = http.post(send, json=request_body(session="s" * MAX_ID_LENGTH), headers=PARTNER)
        assert longest.status_code == 202
        too_long = http.post(
            send, json=request_body(session="s" * (MAX_ID_LENGTH + 1)), headers=PARTNER
        )
        assert too_long.status_code == 400
        listed = "/notifications?status=failed&limit="
        assert http.get(f"{listed}{MAX_PAGE_LIMIT}", headers=OPERATOR).status_code == 200
        assert http.get(f"{listed}{MAX_PAGE_LIMIT + 1}", headers=OPERATOR).status_code == 400
