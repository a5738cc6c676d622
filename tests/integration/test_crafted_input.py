"""Crafted input against a real ``notify api`` (issue 23, item 2): never a 500, never an ERROR
log line, never a Sentry event.

The process reports to a loopback Sentry stand-in (``SentryRecorder``); the SDK sends what it
has when the process stops, so the events are read after it stopped. A non-ASCII CSRF token
used to make ``hmac.compare_digest`` raise (500, a traceback, an event); then every route of
the route table (``worker.front.openapi.OPERATIONS``) and of the console gets non-ASCII, empty
and oversized values in every header, parameter and form field the service reads.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.harness import NotifyApi, SentryRecorder
from worker.front.openapi import OPERATIONS

PARTNER_KEY = "crafted-partner-" + uuid.uuid4().hex
OPERATOR_KEY = "crafted-operator-" + uuid.uuid4().hex
CSRF = re.compile(r'name="csrf" value="([^"]+)"')


class Served:
    """The service, its Sentry stand-in, and what both said once stopped."""

    def __init__(self, tmp: Path) -> None:
        self.sentry = SentryRecorder()
        self.api = NotifyApi(
            tmp / "api.log",
            {
                "NOTIFY_GATEWAY_KEYS": f"acme:{PARTNER_KEY}",
                "NOTIFY_OPERATOR_KEYS": OPERATOR_KEY,
                "NOTIFY_SENTRY_DSN": self.sentry.dsn,
                "NOTIFY_LOG_FORMAT": "json",
            },
        )
        self.client = httpx.Client(base_url=self.api.url, timeout=30)
        self.stopped = False

    def stop(self) -> None:
        if not self.stopped:
            self.stopped = True
            self.client.close()
            self.api.stop()  # SIGTERM: the SDK flushes its queue on the way out
            self.sentry.stop()

    def errors_logged(self) -> list[str]:
        lines = []
        for line in self.api.log().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                if "Traceback" in line:
                    lines.append(line)
                continue
            if entry.get("level") in ("ERROR", "CRITICAL"):
                lines.append(line)
        return lines


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    running = Served(tmp_path_factory.mktemp("crafted"))
    yield running
    running.stop()


def _login_form(client: httpx.Client) -> str:
    form = client.get("/console/login")
    found = CSRF.search(form.text)
    assert found, form.text
    return found.group(1)


def test_a_non_ascii_csrf_token_on_login_and_logout_is_a_403(served: Served):
    client = served.client
    _login_form(client)  # a real pre-login cookie: only the token is wrong
    for path in ("/console/login", "/console/logout"):
        answer = client.post(
            path,
            content=b"csrf=%C3%A9&key=x",
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        assert answer.status_code == 403, answer.text
        answer = client.post(path, data={"csrf": "\u00e9\u4e2d\U0001f600", "key": "x"})
        assert answer.status_code == 403, answer.text
    # Logged in, too: the session's token compared with a non-ASCII one.
    token = _login_form(client)
    assert client.post("/console/login", data={"csrf": token, "key": OPERATOR_KEY}).is_redirect
    assert client.post("/console/logout", data={"csrf": "é"}).status_code == 403


# -- every route, crafted values -------------------------------------------------------------------

# Text as a header can carry it (no CR, LF, NUL or other controls: the client library refuses
# those), non-ASCII included: sent as UTF-8 bytes.
_HEADER_TEXT = st.text(
    st.characters(min_codepoint=0x20, blacklist_categories=("Cs",), blacklist_characters="\x7f"),
    max_size=40,
)
_ANY_TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)
_OVERSIZED = st.integers(20_000, 70_000).map(lambda n: "\u00e9" * (n // 2))
VALUES = st.one_of(st.just(""), _ANY_TEXT, _OVERSIZED, st.sampled_from(["%C3%A9", "é", "\x00"]))
HEADER_VALUES = st.one_of(st.just(""), _HEADER_TEXT, _OVERSIZED)

CONSOLE_ROUTES = [
    ("get", "/console", ()),
    ("get", "/console/login", ()),
    ("post", "/console/login", ()),
    ("post", "/console/logout", ()),
    ("get", "/console/messages/{id}", ("id",)),
    ("get", "/console/messages/{id}/{action}", ("id", "action")),
    ("post", "/console/messages/{id}/{action}", ("id", "action")),
]
ROUTES = [
    (op.method, op.path, tuple(p["name"] for p in op.params if p.get("in") == "path"))
    for op in OPERATIONS
] + CONSOLE_ROUTES
QUERY_NAMES = sorted(
    {p["name"] for op in OPERATIONS for p in op.params if p.get("in") == "query"}
    | {"reason", "template", "partner", "since", "until", "cursor", "limit", "next", "done", "id"}
)
FORM_NAMES = ["csrf", "key", "next"]
HEADER_NAMES = ["authorization", "accept", "content-type", "x-forwarded-for", "x-forwarded-proto"]
# The console's cookie: none, a crafted one, or a real one (so checks past it are reached too).
COOKIES = ["none", "crafted", "anonymous", "operator"]
KEYS = [f"Bearer {PARTNER_KEY}", f"Bearer {OPERATOR_KEY}", "Bearer ", "OAuth x"]


@st.composite
def requests(
    draw: Any, route: tuple[str, str, tuple[str, ...]]
) -> tuple[str, str, dict[str, bytes], dict[str, str], bytes]:
    method, template, names = route
    path = template
    for name in names:
        value = draw(VALUES) or "x"
        path = path.replace("{" + name + "}", quote(value[:2000], safe=""))
    query = {name: draw(VALUES)[:300] for name in draw(st.sets(st.sampled_from(QUERY_NAMES)))}
    headers: dict[str, bytes] = {}
    for name in [name for name in HEADER_NAMES if draw(st.booleans())]:
        value = draw(HEADER_VALUES)
        if name == "authorization" and draw(st.booleans()):
            value = draw(st.sampled_from(KEYS)) + value
        # A header value neither starts nor ends with blanks (the client refuses to send it).
        headers[name] = value.strip(" \t").encode("utf-8")
    body = b""
    if method == "post":
        if template.startswith("/console"):
            fields = {name: draw(VALUES) for name in FORM_NAMES}  # each may be empty
            body = "&".join(f"{k}={quote(v, safe='')}" for k, v in fields.items()).encode()
            headers.setdefault("content-type", b"application/x-www-form-urlencoded")
        else:
            text = draw(VALUES)
            body = draw(
                st.sampled_from(
                    [
                        text.encode("utf-8", "surrogatepass"),
                        json.dumps({"sessionId": text, "templateId": text}).encode(),
                    ]
                )
            )
    cookie = draw(st.sampled_from(COOKIES))
    if cookie == "crafted":
        headers["cookie"] = ("notify_console=" + draw(HEADER_VALUES)).strip(" \t").encode()
    elif cookie != "none":
        headers["cookie"] = cookie.encode()  # replaced by the real one in the test
    return method, path, headers, query, body


@pytest.fixture(scope="module")
def cookies(served: Served) -> dict[str, str]:
    """Real console cookies: a login form's, and a logged-in operator's."""
    found = {}
    with httpx.Client(base_url=served.api.url, timeout=30) as fresh:
        _login_form(fresh)
        found["anonymous"] = f"notify_console={fresh.cookies['notify_console']}"
    with httpx.Client(base_url=served.api.url, timeout=30) as fresh:
        answer = fresh.post(
            "/console/login", data={"csrf": _login_form(fresh), "key": OPERATOR_KEY}
        )
        assert answer.is_redirect
        found["operator"] = f"notify_console={fresh.cookies['notify_console']}"
    return found


@pytest.mark.parametrize("route", ROUTES, ids=[f"{m.upper()} {p}" for m, p, _ in ROUTES])
def test_crafted_values_in_every_field_of_every_route_never_make_a_500(
    served: Served, cookies: dict[str, str], route: tuple[str, str, tuple[str, ...]]
):
    @settings(
        max_examples=40,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(request=requests(route))
    def never_a_500(request: tuple[str, str, dict[str, bytes], dict[str, str], bytes]) -> None:
        _send_crafted(served, cookies, request)

    never_a_500()


def _send_crafted(
    served: Served,
    cookies: dict[str, str],
    request: tuple[str, str, dict[str, bytes], dict[str, str], bytes],
) -> None:
    method, path, headers, query, body = request
    if headers.get("cookie", b"").decode("latin-1") in cookies:
        headers["cookie"] = cookies[headers["cookie"].decode()].encode()
    with httpx.Client(base_url=served.api.url, timeout=30) as client:  # no cookie jar
        answer = client.request(method, path, params=query, headers=headers, content=body)
    assert answer.status_code < 500, (method, path, answer.status_code, answer.text[:300])


def test_nothing_was_logged_as_an_error_nor_sent_to_sentry(served: Served):
    # Runs after the tests above (file order): stop the service so the SDK has flushed.
    served.stop()
    assert served.errors_logged() == []
    assert served.sentry.events() == []
