"""The API, the console and the CLI list the same dead letters for the same ``since``/``until``:
one filter, one time parser (worker/store/query.py). Real Redis, the real app and a real
``notify`` process."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from worker.front.api import create_app
from worker.settings import load_settings
from worker.shapes.models import message_id
from worker.store.codec import AttemptRecord, Failure

ROOT = Path(__file__).resolve().parents[2]
NOTIFY = str(Path(sys.executable).parent / "notify")
OPERATOR_KEY = "operator-key-" + uuid.uuid4().hex
CSRF = re.compile(r'name="csrf" value="([^"]+)"')
CONSOLE_LINK = re.compile(r'href="/console/messages/([A-Za-z0-9_-]+)"')


def _ms(text: str) -> int:
    return int(datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp() * 1000)


# When each dead letter failed, around 25 November 2026 (UTC).
DEAD_AT = {
    "day_before_last_ms": _ms("2026-11-24T23:59:59.999"),
    "midnight": _ms("2026-11-25T00:00:00"),
    "noon": _ms("2026-11-25T12:00:00"),
    "noon_last_ms": _ms("2026-11-25T12:00:00.999"),
    "last_ms": _ms("2026-11-25T23:59:59.999"),
    "next_day": _ms("2026-11-26T00:00:00"),
}


@pytest.fixture(scope="module")
def letters(runtime: Any) -> tuple[str, dict[str, str]]:
    """A template of this module's own, and a dead letter of it at each time of ``DEAD_AT``."""
    template = f"t-until-{uuid.uuid4().hex[:8]}"
    ids = {}
    for name, at_ms in DEAD_AT.items():
        user, session = f"user-{uuid.uuid4().hex[:8]}", f"s-{name}"
        ident = message_id(user, session, template)
        request = {"userId": user, "sessionId": session, "templateId": template, "context": {}}
        attempt = AttemptRecord(1, at_ms, "dead", 400, "http_400", 10, None)
        failure = Failure("api_rejected", "refused", 400, task_id="task-1", worker="test")
        # With an attempt, the letter is dead at the attempt's time.
        assert runtime.store.dead_letter(ident, failure, attempt=attempt, request=request)
        ids[name] = ident
    return template, ids


@pytest.fixture(scope="module")
def app(runtime: Any) -> Iterator[TestClient]:
    with TestClient(create_app(load_settings(operator_keys=OPERATOR_KEY), runtime)) as client:
        yield client


def _api(app: TestClient, template: str, **times: str) -> set[str]:
    answer = app.get(
        "/notifications",
        params={"status": "failed", "template": template, "limit": "100", **times},
        headers={"Authorization": f"Bearer {OPERATOR_KEY}", "Accept": "application/json"},
    )
    assert answer.status_code == 200, answer.text
    return {item["NotificationURI"].rsplit("/", 1)[1] for item in answer.json()}


def _console(app: TestClient, template: str, **times: str) -> set[str]:
    form = app.get("/console/login")
    found = CSRF.search(form.text)
    assert found, form.text
    login = {"csrf": found.group(1), "key": OPERATOR_KEY, "next": "/console"}
    assert app.post("/console/login", data=login, follow_redirects=False).status_code == 303
    page = app.get("/console", params={"template": template, "limit": "100", **times})
    assert page.status_code == 200
    assert "is not a date and time" not in page.text
    return set(CONSOLE_LINK.findall(page.text))


def _cli(template: str, **times: str) -> set[str]:
    options = [part for name, value in times.items() for part in (f"--{name}", value)]
    done = subprocess.run(
        [NOTIFY, "failed", "list", "--json", "--limit", "100", "--template", template, *options],
        cwd=ROOT,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return {item["id"] for item in json.loads(done.stdout)["items"]}


def _named(ids: dict[str, str], *names: str) -> set[str]:
    return {ids[name] for name in names}


@pytest.mark.parametrize(
    ("times", "expected"),
    [
        # A date alone: through the end of that day.
        (
            {"until": "2026-11-25"},
            ("day_before_last_ms", "midnight", "noon", "noon_last_ms", "last_ms"),
        ),
        (
            {"since": "2026-11-25", "until": "2026-11-25"},
            ("midnight", "noon", "noon_last_ms", "last_ms"),
        ),
        # A date-time: up to and including that second.
        (
            {"until": "2026-11-25T12:00:00"},
            ("day_before_last_ms", "midnight", "noon", "noon_last_ms"),
        ),
        ({"since": "2026-11-25T12:00:00"}, ("noon", "noon_last_ms", "last_ms", "next_day")),
    ],
)
def test_api_console_and_cli_list_the_same_dead_letters(
    app: TestClient,
    letters: tuple[str, dict[str, str]],
    times: dict[str, str],
    expected: tuple[str, ...],
) -> None:
    template, ids = letters
    wanted = _named(ids, *expected)
    assert _api(app, template, **times) == wanted
    assert _console(app, template, **times) == wanted
    assert _cli(template, **times) == wanted
