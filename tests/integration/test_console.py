"""The dead-letter console (``/console``, worker/front/console.py) of the real ``notify api``
process, over real HTTP and against real Redis: its sessions, CSRF tokens and cookie flags with
httpx, and
the whole operator's path in a real browser (Debian's Chromium through Playwright): log in,
filter, open a dead letter the real pipeline made, replay it and see it delivered."""

from __future__ import annotations

import html
import re
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from tests.harness import OPERATOR_KEY, NotifyApi, dead_letter, wait_for

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
PARTNER_KEY = "acme-key-" + uuid.uuid4().hex
PARTNER = {"Authorization": f"Bearer {PARTNER_KEY}"}
CSRF = re.compile(r'name="csrf" value="([^"]+)"')


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NotifyApi]:
    service = NotifyApi(
        tmp_path_factory.mktemp("console") / "api.log",
        {"NOTIFY_GATEWAY_KEYS": f"acme:{PARTNER_KEY}", "NOTIFY_OPERATOR_KEYS": OPERATOR_KEY},
    )
    yield service
    service.stop()


@pytest.fixture
def anonymous(api: NotifyApi) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=api.url, timeout=30) as client:
        yield client


def _csrf(response: httpx.Response) -> str:
    found = CSRF.search(response.text)
    assert found, response.text
    return found.group(1)


def _login(client: httpx.Client, key: str = OPERATOR_KEY) -> httpx.Response:
    form = client.get("/console/login")
    assert form.status_code == 200
    return client.post("/console/login", data={"csrf": _csrf(form), "key": key, "next": "/console"})


@pytest.fixture
def operator(api: NotifyApi) -> Iterator[httpx.Client]:
    """A client logged in to the console."""
    with httpx.Client(base_url=api.url, timeout=30) as client:
        answer = _login(client)
        assert answer.status_code == 303, answer.text
        yield client


# -- plain HTTP ------------------------------------------------------------------------------------


def test_pages_without_a_session_redirect_to_login_and_posts_are_401(anonymous, runtime, user_id):
    ident = dead_letter(runtime, user_id)
    for path in ("/console", f"/console/messages/{ident}", f"/console/messages/{ident}/replay"):
        answer = anonymous.get(path)
        assert answer.status_code == 303, path
        assert answer.headers["location"].startswith("/console/login?next=%2Fconsole")
    for path in (f"/console/messages/{ident}/replay", f"/console/messages/{ident}/delete"):
        answer = anonymous.post(path, data={"csrf": "x"})
        assert answer.status_code == 401
        assert "text/html" in answer.headers["content-type"]
    # A forged or tampered cookie is no session either.
    anonymous.cookies.set("notify_console", "eyJvcCI6ImFkbWluIn0.c2lnbmF0dXJl", path="/console")
    assert anonymous.get("/console").status_code == 303
    assert runtime.deadletters.get(ident) is not None


def test_login_refuses_a_wrong_key_a_partner_key_and_a_missing_token(anonymous):
    for key in ("not-a-key", PARTNER_KEY, ""):
        answer = _login(anonymous, key)
        assert answer.status_code == 401, key
        assert "not an operator key" in answer.text or key == ""
        assert anonymous.get("/console").status_code == 303
    form = anonymous.get("/console/login")
    token = _csrf(form)
    for data in ({"key": OPERATOR_KEY}, {"key": OPERATOR_KEY, "csrf": token + "x"}):
        answer = anonymous.post("/console/login", data=data)
        assert answer.status_code == 403
        assert anonymous.get("/console").status_code == 303
    # Without the login page's cookie, even the right token is no good.
    anonymous.cookies.clear()
    answer = anonymous.post("/console/login", data={"key": OPERATOR_KEY, "csrf": token})
    assert answer.status_code == 403


def test_session_cookie_is_httponly_samesite_strict_and_secure_over_https(anonymous, api):
    answer = _login(anonymous)
    assert answer.status_code == 303
    assert answer.headers["location"] == "/console"
    cookie = answer.headers["set-cookie"]
    flags = {part.strip().split("=")[0].lower(): part.strip() for part in cookie.split(";")}
    assert "httponly" in flags
    assert flags["samesite"].lower() == "samesite=strict"
    assert flags["path"] == "Path=/console"
    assert "secure" not in flags  # plain http on loopback
    assert OPERATOR_KEY not in cookie
    assert anonymous.get("/console").status_code == 200

    # Behind a TLS-terminating proxy (uvicorn trusts X-Forwarded-Proto from loopback): Secure.
    with httpx.Client(base_url=api.url, timeout=30) as client:
        form = client.get("/console/login", headers={"X-Forwarded-Proto": "https"})
        assert "secure" in form.headers["set-cookie"].lower()
        token = _csrf(form)
        cookie_value = form.cookies["notify_console"]
        answer = client.post(
            "/console/login",
            data={"csrf": token, "key": OPERATOR_KEY},
            headers={"X-Forwarded-Proto": "https", "Cookie": f"notify_console={cookie_value}"},
        )
        assert answer.status_code == 303
        parts = [part.strip().lower() for part in answer.headers["set-cookie"].split(";")]
        assert {"secure", "httponly", "samesite=strict"} <= set(parts)


def test_the_login_page_never_redirects_off_the_console(anonymous):
    for target in ("https://evil.example/", "//evil.example", "/consolex", "/console\\@evil"):
        form = anonymous.get("/console/login", params={"next": target})
        answer = anonymous.post(
            "/console/login", data={"csrf": _csrf(form), "key": OPERATOR_KEY, "next": target}
        )
        assert answer.headers["location"] == "/console", target
        anonymous.cookies.clear()


@pytest.mark.parametrize("action", ["replay", "delete"])
def test_replay_and_delete_refuse_a_missing_or_wrong_csrf_token(
    operator, api, runtime, user_id, action
):
    ident = dead_letter(runtime, user_id)
    path = f"/console/messages/{ident}/{action}"
    confirm = operator.get(path)
    assert confirm.status_code == 200
    token = _csrf(confirm)
    with httpx.Client(base_url=api.url, timeout=30) as other:
        assert _login(other).status_code == 303
        other_token = _csrf(other.get("/console"))  # another operator's session's token
    assert other_token != token
    for data in ({}, {"csrf": ""}, {"csrf": token[:-1]}, {"csrf": other_token}):
        answer = operator.post(path, data=data)
        assert answer.status_code == 403, data
        assert runtime.deadletters.get(ident) is not None, data
    answer = operator.post(path, data={"csrf": token})
    assert answer.status_code == 303
    assert runtime.deadletters.get(ident) is None
    if action == "replay":
        assert answer.headers["location"] == f"/console/messages/{ident}?done=replayed"
    else:
        assert runtime.store.status(ident) is None
        assert operator.get(answer.headers["location"]).text.count(ident) == 1  # the notice


def test_logout_needs_the_token_and_ends_the_session(operator):
    page = operator.get("/console")
    assert operator.post("/console/logout", data={}).status_code == 403
    answer = operator.post("/console/logout", data={"csrf": _csrf(page)})
    assert answer.status_code == 303
    assert "max-age=0" in answer.headers["set-cookie"].lower()
    assert operator.get("/console").status_code == 303


def test_filters_time_range_and_paging(operator, runtime, user_id):
    started = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S")
    time.sleep(1.1)  # "since" is to the second
    ids = [
        dead_letter(runtime, user_id, template="t-dead", reason="retries_exhausted")
        for _ in range(30)
    ]
    other = dead_letter(runtime, user_id, template="welcome", reason="retries_exhausted")
    partnered = dead_letter(
        runtime, user_id, template="t-dead", reason="retries_exhausted", partner="acme"
    )
    query = {"reason": "retries_exhausted", "template": "t-dead", "since": started}

    def shown(params: dict[str, Any]) -> tuple[list[str], dict[str, str] | None]:
        page = operator.get("/console", params=params)
        assert page.status_code == 200
        found = re.findall(r'href="/console/messages/([A-Za-z0-9_-]+)"', page.text)
        link = re.search(r'rel="next" href="([^"]+)"', page.text)
        if link is None:
            return found, None
        following = parse_qs(urlsplit(html.unescape(link.group(1))).query)
        return found, {name: values[0] for name, values in following.items()}

    first, following = shown(query)
    assert len(first) == 25 and following is not None
    assert following["template"] == "t-dead"  # the filters carry over to the next page
    rest, end = shown(following)
    assert end is None
    assert set(first) | set(rest) == {*ids, partnered}
    assert other not in first + rest
    only_acme, _ = shown({**query, "partner": "acme"})
    assert only_acme == [partnered]
    until = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S")
    assert shown({**query, "until": started})[0] == []
    assert len(shown({**query, "until": until, "limit": "100"})[0]) == 31
    bad = operator.get("/console", params={"since": "yesterday", "partner": "no such!"})
    assert bad.status_code == 200
    assert "since is not a date and time" in bad.text and "not a partner name" in bad.text


# -- the browser -----------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.skipif(not CHROMIUM.exists(), reason="Chromium is not installed (/usr/bin/chromium)")
@pytest.mark.usefixtures("celery_worker_process")
def test_operator_logs_in_filters_opens_a_dead_letter_replays_it_and_sees_it_delivered(
    api, runtime, sandbox, user_id, tmp_path
):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    started = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S")
    # A dead letter made by the real pipeline: the gateway queues it, the worker posts it, the
    # stand-in Concur refuses it once (400 with errors[]), the worker dead-letters it.
    api_errors = [
        {"errorId": "e-42", "errorCode": "USER_UNKNOWN", "errorMessage": "no such user in Concur"}
    ]
    sandbox.script([{"status": 400, "errors": api_errors}], user_id=user_id)
    body = {
        "sessionId": f"s-{uuid.uuid4().hex[:8]}",
        "templateId": "t-dead",
        "context": {"url": "https://app.example.com/reports/7"},
    }
    with httpx.Client(base_url=api.url, timeout=30, headers=PARTNER) as client:
        queued = client.post(f"/messages/{user_id}/session", json=body).json()
        wait_for(
            lambda: client.get(f"/messages/{queued['id']}").json()["status"] == "failed",
            what="the message to be dead-lettered",
        )
    ident = queued["id"]
    correlation_id = sandbox.requests(user_id=user_id)[0]["correlationId"]
    # Others around it, for the filters to leave out.
    for template, reason, partner in (
        ("t-dead", "retries_exhausted", "acme"),
        ("welcome", "api_rejected", "acme"),
        ("t-dead", "api_rejected", None),
        ("expense-approved", "url_not_allowed", None),
    ):
        dead_letter(runtime, f"{user_id}-x", template=template, reason=reason, partner=partner)

    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 900})
            page.goto(f"{api.url}/console")
            assert page.url.startswith(f"{api.url}/console/login")
            page.fill("#key", "not-the-key")
            page.click("button[type=submit]")
            sync_api.expect(page.get_by_role("alert")).to_contain_text("not an operator key")
            page.fill("#key", OPERATOR_KEY)
            page.click("button[type=submit]")
            page.wait_for_url(f"{api.url}/console")
            sync_api.expect(page.locator("#breaker-state")).to_have_text(
                re.compile("closed|open|half-open")
            )
            sync_api.expect(page.locator("#letters tbody tr").first).to_be_visible()
            page.screenshot(path=str(tmp_path / "console.png"), full_page=True)

            page.select_option("select[name=reason]", "api_rejected")
            page.fill("input[name=template]", "t-dead")
            page.fill("input[name=partner]", "acme")
            page.fill("input[name=since]", started)
            page.click("form.filters button[type=submit]")
            rows = page.locator("#letters tbody tr")
            sync_api.expect(rows).to_have_count(1)
            sync_api.expect(rows.first).to_contain_text(user_id)
            page.screenshot(path=str(tmp_path / "console-filtered.png"), full_page=True)

            page.click(f"a[href='/console/messages/{ident}']")
            sync_api.expect(page.locator("#state")).to_have_text("failed")
            attempts = page.locator("#attempts tbody tr")
            sync_api.expect(attempts).to_have_count(1)
            sync_api.expect(attempts.first).to_contain_text(correlation_id)
            sync_api.expect(attempts.first).to_contain_text("400")
            sync_api.expect(page.locator("#errors")).to_contain_text("USER_UNKNOWN")
            sync_api.expect(page.locator("#errors")).to_contain_text("no such user in Concur")
            page.screenshot(path=str(tmp_path / "console-detail.png"), full_page=True)

            page.click("text=Replay…")
            sync_api.expect(page.locator("h1")).to_contain_text("Replay this message?")
            page.click("text=Yes, replay it")
            sync_api.expect(page.get_by_role("status")).to_contain_text("Replayed")
            # The page reloads itself while the message moves; the sandbox's script is used up,
            # so this attempt is accepted.
            sync_api.expect(page.locator("#state")).to_have_text("delivered", timeout=30_000)
            sync_api.expect(page.locator("#attempts tbody tr")).to_have_count(2)
            page.screenshot(path=str(tmp_path / "console-delivered.png"), full_page=True)
        finally:
            browser.close()
    assert runtime.deadletters.get(ident) is None
    assert runtime.store.status(ident)["state"] == "delivered"
    assert (tmp_path / "console.png").stat().st_size > 10_000
