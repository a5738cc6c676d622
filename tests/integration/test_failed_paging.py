"""The failed list pages by a keyset cursor on (time, id) (issue 22, item 6), on real Redis: dead
letters added and deleted while an operator pages never make a row repeat or go missing, in the
store, the API (following ``Link: rel=next``) and the CLI; and the list's JSON says
``application/json; charset=utf-8`` with the seed's ``EventDateTime`` (no offset, UTC).

Letters are written by the real store; their dead-letter time is chosen by pinning the store's
clock, so that several share one millisecond (ties the cursor must order by id) and chunk
boundaries fall inside such ties (``SCAN_CHUNK`` made small).
"""

from __future__ import annotations

import html
import json
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from click.testing import CliRunner

from tests.harness import OPERATOR, OPERATOR_KEY, ServerThread
from tests.harness import app_settings as _settings
from tests.harness import dead_letter as _dead_letter
from worker.front.api import create_app
from worker.front.cli import main as notify_cli
from worker.front.notifications import NAMESPACE
from worker.store import deadletters, records
from worker.store.query import PageCursor, decode_cursor, encode_cursor

T0 = 1_780_000_000_000  # 2026-05-28T20:26:40Z
SEED_TIME = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}$")  # 2012-11-14T19:45:25


@pytest.fixture
def letter_at(monkeypatch: pytest.MonkeyPatch) -> Callable[[Any, str, int], str]:
    """Write a dead letter for ``user`` dead-lettered at ``ms`` (the store's clock pinned)."""

    def write(runtime: Any, user: str, ms: int) -> str:
        with monkeypatch.context() as patched:
            patched.setattr(records, "now_ms", lambda: ms)
            return _dead_letter(runtime, user)

    return write


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    # Chunks of 4 through groups of 3 letters per millisecond: boundaries fall inside ties.
    monkeypatch.setattr(deadletters, "SCAN_CHUNK", 4)


class Walk:
    """A set of letters an operator pages through, changed between pages as the test says."""

    def __init__(
        self, runtime: Any, user: str, write: Callable[[Any, str, int], str], count: int = 30
    ) -> None:
        self.runtime = runtime
        self.user = user
        self.write = write
        # ``count`` letters, three per millisecond: the newest at T0 + count/3, the oldest at T0.
        self.present = {write(runtime, user, T0 + i // 3): T0 + i // 3 for i in range(count)}
        self.expected = set(self.present)  # what the walk must show exactly once
        self.newer = 0
        self.older = 0

    def change(self, seen: list[str]) -> None:
        """Between two pages: add a letter newer than every other (the walk is past it), add
        one older than every other (still ahead: it must be shown), delete a letter already
        shown and one not yet shown (it must not be)."""
        self.newer += 1
        self.write(self.runtime, self.user, T0 + 1000 + self.newer)
        self.older += 1
        self.expected.add(self.write(self.runtime, self.user, T0 - 10 - self.older))
        shown = [letter for letter in seen if letter in self.present]
        if shown:
            self._delete(shown[-1])
        ahead = sorted(
            (letter for letter in self.present if letter not in seen),
            key=lambda letter: (self.present.get(letter, 0), letter),
        )
        if len(ahead) > 1:
            gone = ahead[len(ahead) // 2]
            self._delete(gone)
            self.expected.discard(gone)

    def _delete(self, letter: str) -> None:
        assert self.runtime.deadletters.delete(letter)
        del self.present[letter]

    def check(self, pages: list[list[str]], min_pages: int = 5) -> None:
        """No row twice, none missing, newest first by (time, id)."""
        seen = [letter for page in pages for letter in page]
        assert len(seen) == len(set(seen)), "a row repeated"
        assert set(seen) == self.expected, "a row missing or one deleted before it was shown"
        assert len(pages) >= min_pages
        places = [(self.runtime.deadletters.get(letter), letter) for letter in seen]
        order = [(letter.dead_ms, ident) for letter, ident in places if letter is not None]
        assert order == sorted(order, reverse=True)


def test_store_pages_never_repeat_or_skip_while_letters_come_and_go(
    isolated, letter_at, small_chunks, user_id
):
    runtime = isolated.runtime
    walk = Walk(runtime, user_id, letter_at)
    pages: list[list[str]] = []
    after: PageCursor | None = None
    while True:
        page = runtime.deadletters.page(after=after, limit=4)
        pages.append([letter.id for letter in page.items])
        if page.next_cursor is None:
            break
        after = page.next_cursor
        walk.change([letter for shown in pages for letter in shown])
    walk.check(pages)


def test_api_pages_never_repeat_or_skip_while_letters_come_and_go(
    isolated, letter_at, small_chunks, user_id
):
    runtime = isolated.runtime
    walk = Walk(runtime, user_id, letter_at)
    headers = {**OPERATOR, "Accept": "application/json"}
    pages: list[list[str]] = []
    with (
        ServerThread(create_app(_settings(), runtime)) as server,
        httpx.Client(base_url=server.url, timeout=30) as http,
    ):
        response = http.get(
            "/notifications", params={"status": "failed", "limit": 4}, headers=headers
        )
        while True:
            assert response.status_code == 200, response.text
            pages.append([item["NotificationURI"].rsplit("/", 1)[1] for item in response.json()])
            if "link" not in response.headers:
                break
            link = response.headers["link"]
            cursor = response.headers["x-next-cursor"]
            assert f"cursor={cursor}" in link
            assert decode_cursor(cursor) is not None
            walk.change([letter for shown in pages for letter in shown])
            response = http.get(link[1 : link.index(">")], headers=headers)
    walk.check(pages)


def test_cli_pages_never_repeat_or_skip_while_letters_come_and_go(
    runtime, letter_at, small_chunks, user_id
):
    walk = Walk(runtime, user_id, letter_at)
    pages: list[list[str]] = []
    cursor: list[str] = []
    while True:
        result = CliRunner().invoke(
            notify_cli, ["failed", "list", "--json", "--user", user_id, "--limit", "4", *cursor]
        )
        assert result.exit_code == 0, result.output
        out = json.loads(result.output)
        pages.append([item["id"] for item in out["items"]])
        if out["nextCursor"] is None:
            break
        cursor = ["--cursor", out["nextCursor"]]
        walk.change([letter for shown in pages for letter in shown])
    walk.check(pages)
    refused = CliRunner().invoke(notify_cli, ["failed", "list", "--cursor", "12"])
    assert refused.exit_code == 2
    assert "--cursor" in refused.output


def test_console_pages_never_repeat_or_skip_while_letters_come_and_go(isolated, letter_at, user_id):
    runtime = isolated.runtime
    walk = Walk(runtime, user_id, letter_at, count=90)  # pages of 25: four of them
    pages: list[list[str]] = []
    with (
        ServerThread(create_app(_settings(), runtime)) as server,
        httpx.Client(base_url=server.url, timeout=30) as console,
    ):
        form = console.get("/console/login")
        csrf = re.search(r'name="csrf" value="([^"]+)"', form.text)
        assert csrf is not None, form.text
        data = {"csrf": csrf.group(1), "key": OPERATOR_KEY, "next": "/console"}
        assert console.post("/console/login", data=data).status_code == 303
        path = "/console"
        while True:
            page = console.get(path)
            assert page.status_code == 200
            pages.append(re.findall(r'href="/console/messages/([A-Za-z0-9_-]+)"', page.text))
            link = re.search(r'rel="next" href="([^"]+)"', page.text)
            if link is None:
                break
            path = html.unescape(link.group(1))
            walk.change([letter for shown in pages for letter in shown])
        stale = console.get("/console", params={"cursor": "12"})  # an old offset
        assert stale.status_code == 200
        assert "not one this console gave" in stale.text
    walk.check(pages, min_pages=4)


@pytest.fixture
def http_isolated(isolated: Any) -> Iterator[httpx.Client]:
    with (
        ServerThread(create_app(_settings(), isolated.runtime)) as server,
        httpx.Client(base_url=server.url, timeout=30) as http,
    ):
        yield http


def test_list_json_is_utf8_json_with_the_seeds_event_time_in_utc(
    isolated, http_isolated, letter_at, user_id
):
    ident = letter_at(isolated.runtime, user_id, T0 + 5_250)  # 2026-05-28T20:26:45.250Z
    listed = http_isolated.get(
        "/notifications", params={"status": "failed"}, headers={**OPERATOR, "Accept": "*/*"}
    )
    assert listed.status_code == 200
    assert listed.headers["content-type"] == "application/json; charset=utf-8"
    [item] = listed.json()
    assert item["EventDateTime"] == "2026-05-28T20:26:45"
    assert SEED_TIME.match(item["EventDateTime"])
    one = http_isolated.get(f"/notifications/{ident}", headers=OPERATOR)
    assert one.headers["content-type"] == "application/json; charset=utf-8"
    assert one.json()["EventDateTime"] == "2026-05-28T20:26:45"
    # The XML's EventDateTime is the seed's form too.
    xml = http_isolated.get(
        f"/notifications/{ident}", headers={**OPERATOR, "Accept": "application/xml"}
    )
    root = ET.fromstring(xml.content)
    assert root.findtext(f"{{{NAMESPACE}}}EventDateTime") == "2026-05-28T20:26:45"
    # Every JSON answer says its charset, errors included.
    missing = http_isolated.get("/notifications/nosuchletter", headers=OPERATOR)
    assert missing.status_code == 404
    assert missing.headers["content-type"] == "application/json; charset=utf-8"


@pytest.mark.parametrize(
    "cursor", ["12", "-1", "", "!!", encode_cursor(PageCursor(5, "x")) + "=", "a" * 200]
)
def test_a_cursor_we_did_not_give_is_400(http_isolated, cursor):
    response = http_isolated.get(
        "/notifications", params={"status": "failed", "cursor": cursor}, headers=OPERATOR
    )
    assert response.status_code == 400, response.text
    assert [e["errorCode"] for e in response.json()["errors"]] == ["INVALID_PARAMETER"]
