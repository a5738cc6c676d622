"""The ``notify`` command as a user runs it: a real process, real Redis, a real worker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import wait_for

ROOT = Path(__file__).resolve().parent.parent
NOTIFY = str(Path(sys.executable).parent / "notify")

pytestmark = pytest.mark.usefixtures("celery_worker_process")


def notify(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [NOTIFY, *args],
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


def _state(runtime: Any, message_id: str) -> str | None:
    record = runtime.store.status(message_id)
    return record["state"] if record else None


def test_send_prints_the_message_id_and_it_is_delivered(runtime, sandbox, user_id):
    result = notify("send", user_id, "--session", "cli-1", "--template", "welcome")
    assert result.returncode == 0, result.stderr
    message_id = result.stdout.strip()
    wait_for(lambda: _state(runtime, message_id) == "delivered")
    again = notify("send", user_id, "--session", "cli-1", "--template", "welcome")
    assert again.stdout.strip() == message_id
    assert "already submitted" in again.stderr
    status = json.loads(notify("status", message_id).stdout)
    assert status["state"] == "delivered"
    assert len(sandbox.requests(user_id=user_id)) == 1


@pytest.mark.parametrize(
    ("args", "code", "text"),
    [
        (["send", "u", "--session", "s", "--template", "nope"], 1, "templateId"),
        (["send", "u", "--session", "s", "--template", "welcome", "--url", "http://x"], 1, "https"),
        (["failed", "show", "no-such-id"], 4, "no failed notification"),
        (["failed", "replay"], 1, "give one or more ids"),
        (["failed", "delete", "x", "--all"], 1, "not both"),
        (["status", "nothing-here"], 4, "no message"),
    ],
)
def test_user_mistakes_get_one_error_line_and_a_non_zero_exit(args, code, text):
    result = notify(*args)
    assert result.returncode == code
    assert result.stderr.startswith("error: ")
    assert text in result.stderr
    assert "Traceback" not in result.stderr


def test_unreachable_redis_is_a_clear_error():
    result = notify("failed", "list", env={"NOTIFY_REDIS_URL": "redis://127.0.0.1:1/0"})
    assert result.returncode == 3
    assert "cannot reach Redis" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_setting_is_a_clear_error():
    result = notify("failed", "list", env={"NOTIFY_MAX_ATTEMPTS": "many"})
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: NOTIFY_MAX_ATTEMPTS")


def test_failed_list_show_replay_delete(runtime, sandbox, user_id):
    sandbox.script([{"status": 404}, {"status": 404}], user_id=user_id)
    ids = []
    for session in ("a", "b"):
        result = notify("send", user_id, "--session", session, "--template", "welcome")
        ids.append(result.stdout.strip())
    for message_id in ids:
        wait_for(lambda m=message_id: _state(runtime, m) == "failed")

    listed = json.loads(notify("failed", "list", "--json", "--user", user_id).stdout)
    assert {item["id"] for item in listed["items"]} == set(ids)
    assert all(item["reason"] == "api_rejected" for item in listed["items"])
    paged = json.loads(notify("failed", "list", "--json", "--user", user_id, "--limit", "1").stdout)
    assert len(paged["items"]) == 1 and paged["nextCursor"] is not None
    rest = json.loads(
        notify(
            "failed", "list", "--json", "--user", user_id, "--cursor", str(paged["nextCursor"])
        ).stdout
    )
    assert {paged["items"][0]["id"], rest["items"][0]["id"]} == set(ids)

    def listed_since(when: str) -> set[str]:
        result = notify("failed", "list", "--json", "--user", user_id, "--since", when)
        return {item["id"] for item in json.loads(result.stdout)["items"]}

    assert listed_since("2000-01-01") == set(ids)
    assert listed_since("2999-01-01T00:00:00") == set()

    table = notify("failed", "list", "--user", user_id).stdout
    assert ids[0] in table and "api_rejected" in table

    shown = json.loads(notify("failed", "show", ids[0]).stdout)
    assert shown["status"] == 404 and shown["user_id"] == user_id

    replayed = notify("failed", "replay", ids[0])
    assert replayed.returncode == 0 and "replayed 1" in replayed.stdout
    wait_for(lambda: _state(runtime, ids[0]) == "delivered")

    deleted = notify("failed", "delete", "--all", "--user", user_id)
    assert "deleted 1" in deleted.stdout
    assert json.loads(notify("failed", "list", "--json", "--user", user_id).stdout)["items"] == []
