"""Console sessions kept in Redis (issue 23, item 7): logging out ends the session for good, an
unused session expires, and the cookie is itsdangerous-signed.

The replay is against a real ``notify api`` over HTTP; the idle and lifetime limits against the
real session store on real Redis with an injected clock (no waiting).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from itsdangerous import URLSafeTimedSerializer

from tests.harness import NotifyApi
from worker.front.sessions import LIFETIME_SECONDS, SessionPolicy, Sessions
from worker.store import keys

OPERATOR_KEY = "sessions-operator-" + uuid.uuid4().hex
CSRF = re.compile(r'name="csrf" value="([^"]+)"')


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NotifyApi]:
    service = NotifyApi(
        tmp_path_factory.mktemp("sessions") / "api.log", {"NOTIFY_OPERATOR_KEYS": OPERATOR_KEY}
    )
    yield service
    service.stop()


def _csrf(response: httpx.Response) -> str:
    found = CSRF.search(response.text)
    assert found, response.text
    return found.group(1)


def _logged_in(api: NotifyApi) -> tuple[httpx.Client, str]:
    client = httpx.Client(base_url=api.url, timeout=30)
    token = _csrf(client.get("/console/login"))
    answer = client.post("/console/login", data={"csrf": token, "key": OPERATOR_KEY})
    assert answer.status_code == 303, answer.text
    return client, client.cookies["notify_console"]


def test_a_cookie_replayed_after_logout_no_longer_opens_the_console(api: NotifyApi, runtime: Any):
    client, cookie = _logged_in(api)
    page = client.get("/console")
    assert page.status_code == 200 and "operator key" in page.text
    sessions_before = set(runtime.redis.scan_iter(keys.console_session("*")))
    assert sessions_before  # the session is in Redis

    assert client.post("/console/logout", data={"csrf": _csrf(page)}).status_code == 303
    client.close()

    # An attacker who copied the cookie before the logout sends it again.
    with httpx.Client(base_url=api.url, timeout=30) as replay:
        replay.cookies.set("notify_console", cookie, path="/console")
        answer = replay.get("/console")
        assert answer.status_code == 303
        assert answer.headers["location"].startswith("/console/login")
        refused = replay.post("/console/messages/x/delete", data={"csrf": _csrf(page)})
        assert refused.status_code == 401


def test_the_cookie_holds_a_signed_session_id_and_nothing_else(api: NotifyApi):
    client, cookie = _logged_in(api)
    client.close()
    # itsdangerous's format: payload.timestamp.signature; the payload is the id only.
    payload = URLSafeTimedSerializer(b"any", salt="x").load_payload(cookie.split(".")[0].encode())
    assert set(payload) == {"sid"}
    assert OPERATOR_KEY not in cookie
    # A tampered cookie opens nothing.
    with httpx.Client(base_url=api.url, timeout=30) as forged:
        forged.cookies.set("notify_console", cookie[:-2] + "AA", path="/console")
        assert forged.get("/console").status_code == 303


class Clock:
    """A clock the test moves."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def test_an_unused_session_expires_after_the_idle_limit_and_a_used_one_lives_on(runtime: Any):
    clock = Clock()
    sessions = Sessions(runtime.redis, b"secret-" + uuid.uuid4().bytes, SessionPolicy(600), clock)
    used = sessions.start("op1")
    unused = sessions.start("op1")
    used_cookie, unused_cookie = sessions.cookie(used), sessions.cookie(unused)

    clock.now += 500
    assert sessions.read(used_cookie) == used  # used: its idle time starts again
    clock.now += 500  # 1000 s after the start, 500 s after the last use
    assert sessions.read(used_cookie) == used
    assert sessions.read(unused_cookie) is None  # 1000 s unused
    assert not runtime.redis.exists(keys.console_session(str(unused.session_id)))
    assert runtime.redis.ttl(keys.console_session(str(used.session_id))) <= 600


def test_no_session_outlives_its_lifetime_however_often_it_is_used(runtime: Any):
    clock = Clock()
    sessions = Sessions(runtime.redis, b"secret-" + uuid.uuid4().bytes, SessionPolicy(600), clock)
    session = sessions.start("op1")
    cookie = sessions.cookie(session)
    while clock.now + 500 < 1_800_000_000.0 + LIFETIME_SECONDS:
        clock.now += 500
        assert sessions.read(cookie) == session
    clock.now += 500
    assert sessions.read(cookie) is None


def test_ending_a_session_deletes_it_and_a_login_form_cookie_writes_nothing(runtime: Any):
    sessions = Sessions(runtime.redis, b"secret-" + uuid.uuid4().bytes, SessionPolicy(600))
    anonymous = sessions.anonymous()
    assert sessions.read(sessions.cookie(anonymous)) == anonymous
    assert anonymous.session_id is None and not anonymous.logged_in
    session = sessions.start("op1")
    sessions.end(session)
    assert sessions.read(sessions.cookie(session)) is None
