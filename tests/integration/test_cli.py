"""The ``notify`` command as a user runs it: a real process, real Redis, a real worker."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.harness import ROOT, wait_for

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
    status = json.loads(notify("status", message_id, "--json").stdout)
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

    shown = json.loads(notify("failed", "show", ids[0], "--json").stdout)
    assert shown["status"] == 404 and shown["user_id"] == user_id

    replayed = notify("failed", "replay", ids[0])
    assert replayed.returncode == 0 and "replayed 1" in replayed.stdout
    wait_for(lambda: _state(runtime, ids[0]) == "delivered")

    deleted = notify("failed", "delete", "--all", "--yes", "--user", user_id)
    assert "deleted 1" in deleted.stdout
    assert json.loads(notify("failed", "list", "--json", "--user", user_id).stdout)["items"] == []


ISO_TIME = re.compile(r"\b20\d\d-\d\d-\d\dT\d\d:\d\d:\d\dZ\b")


def _narrow(*args: str, columns: int = 80) -> subprocess.CompletedProcess[str]:
    return notify(*args, env={"COLUMNS": str(columns)})


def _fits(text: str, columns: int = 80) -> None:
    assert text.strip()
    assert max(len(line) for line in text.splitlines()) <= columns, text


def test_status_shows_a_delivered_message_for_a_person_and_the_record_with_json(runtime, user_id):
    url = "https://app.example.com/x"
    sent = notify("send", user_id, "--session", "h-1", "--template", "welcome", "--url", url)
    message_id = sent.stdout.strip()
    wait_for(lambda: _state(runtime, message_id) == "delivered")
    record = runtime.store.status(message_id)

    shown = _narrow("status", message_id)
    assert shown.returncode == 0, shown.stderr
    text = shown.stdout
    _fits(text)
    assert "{" not in text  # not JSON
    for line in (
        f"message         {message_id}",
        "state           delivered",
        f"user            {user_id}",
        "template        welcome",
        f"url             {url}",
        "attempts        1",
        "HTTP status     200",
        f"correlation id  {record['cid']}",
    ):
        assert line in text, (line, text)
    assert "next retry" not in text
    # The attempt, with its ISO time, outcome, status and correlation id; no epoch milliseconds.
    row = next(line for line in text.splitlines() if re.match(r"\s*1 .* delivered ", line))
    assert ISO_TIME.search(row) and " 200 " in row and row.endswith(record["cid"]), row
    assert record["created"] not in text

    raw = json.loads(notify("status", message_id, "--json").stdout)
    assert raw == json.loads(json.dumps(runtime.store.status(message_id)))


def test_status_of_a_retrying_message_says_when_the_next_attempt_is(runtime, sandbox, user_id):
    # A 503 with Retry-After: 240 puts the next attempt four minutes away.
    sandbox.script([{"status": 503, "retryAfter": 240}], user_id=user_id)
    message_id = notify("send", user_id, "--session", "h-2", "--template", "welcome").stdout
    message_id = message_id.strip()
    wait_for(lambda: _state(runtime, message_id) == "retrying")
    text = _narrow("status", message_id).stdout
    assert "state           retrying" in text
    assert "HTTP status     503" in text
    next_retry = next(line for line in text.splitlines() if line.startswith("next retry"))
    assert ISO_TIME.search(next_retry), next_retry
    assert re.search(r"\(in [34] min\)", next_retry), next_retry
    row = next(line for line in text.splitlines() if re.match(r"\s*1 .* retry ", line))
    assert " 503 " in row and ISO_TIME.search(row)


def test_status_and_failed_show_give_the_dead_letter_reason_and_the_apis_errors(
    runtime, sandbox, user_id
):
    errors = [{"errorId": "e-1", "errorCode": "BAD_USER", "errorMessage": "no such user"}]
    sandbox.script([{"status": 400, "errors": errors}], user_id=user_id)
    message_id = notify("send", user_id, "--session", "h-3", "--template", "welcome").stdout
    message_id = message_id.strip()
    wait_for(lambda: _state(runtime, message_id) == "failed")

    status = _narrow("status", message_id).stdout
    _fits(status)
    assert "dead-letter reason  api_rejected" in status
    assert "BAD_USER: no such user" in status
    assert "HTTP status         400" in status

    shown = _narrow("failed", "show", message_id)
    assert shown.returncode == 0, shown.stderr
    _fits(shown.stdout)
    letter = runtime.deadletters.get(message_id)
    for line in (
        f"dead letter     {message_id}",
        "reason          api_rejected",
        "HTTP status     400",
        "API error       BAD_USER: no such user",
        "attempts        1",
        f"correlation id  {letter.correlation_id}",
        f"replay: notify failed replay {message_id}",
    ):
        assert line in shown.stdout, (line, shown.stdout)
    failed_at = next(line for line in shown.stdout.splitlines() if line.startswith("failed at"))
    # Relative to now: seconds on a quiet machine, a minute or more when CLI runs are slow.
    assert ISO_TIME.search(failed_at) and re.search(r"\((\d+ (s|min|h) ago|now)\)$", failed_at)

    raw = json.loads(notify("failed", "show", message_id, "--json").stdout)
    assert raw == json.loads(json.dumps(letter.to_dict()))


def test_failed_list_table_fits_the_terminal_with_whole_ids_and_bulk_replay_shows_progress(
    runtime, sandbox, user_id
):
    long_user = user_id + "-" + "x" * 60  # longer than the user column
    sandbox.script([], then={"status": 404}, user_id=long_user)
    ids = [
        notify("send", long_user, "--session", f"p-{n}", "--template", "welcome").stdout.strip()
        for n in range(3)
    ]
    for message_id in ids:
        wait_for(lambda m=message_id: _state(runtime, m) == "failed")

    for columns in (80, 60):
        listed = _narrow("failed", "list", "--user", long_user, columns=columns)
        assert listed.returncode == 0, listed.stderr
        _fits(listed.stdout, columns)
        for message_id in ids:  # never shortened
            assert message_id in listed.stdout
    wide = _narrow("failed", "list", "--user", long_user, columns=160).stdout
    assert all(message_id in wide for message_id in ids)
    assert wide.splitlines()[0].split() == [
        "ID",
        "FAILED",
        "AT",
        "(UTC)",
        "REASON",
        "HTTP",
        "TEMPLATE",
        "USER",
    ]
    paged = _narrow("failed", "list", "--user", long_user, "--limit", "2").stdout
    assert "more: --cursor" in paged

    sandbox.script([], then={"status": 200}, user_id=long_user)
    replayed = notify("failed", "replay", "--all", "--user", long_user, "--progress")
    assert replayed.returncode == 0, replayed.stderr
    assert "replayed 3" in replayed.stdout
    assert "replaying" in replayed.stderr and "3/3" in replayed.stderr
    for message_id in ids:
        wait_for(lambda m=message_id: _state(runtime, m) == "delivered")
    quiet = notify("failed", "delete", "--all", "--user", long_user)
    assert quiet.stdout.strip() == "deleted 0" and quiet.stderr == ""  # no bar off a terminal


def test_stats_is_a_table_that_fits_the_terminal():
    shown = _narrow("stats", "--minutes", "30", columns=70)
    assert shown.returncode == 0, shown.stderr
    _fits(shown.stdout, 70)
    text = shown.stdout
    assert "waiting for retry" in text and "circuit breaker" in text
    assert "delivered per minute (UTC, oldest first, last 30)" in text
    minutes = [line for line in text.splitlines() if re.match(r"\d\d:\d\d ", line)]
    assert len(minutes) == 30


@pytest.mark.parametrize(
    ("offset_s", "words"),
    [
        (240, "in 4 min"),
        (-35, "35 s ago"),
        (0.2, "now"),
        (3 * 3600 + 600, "in 3 h 10 min"),
        (-2 * 86400, "2 d ago"),
    ],
)
def test_relative_times_read_as_words(offset_s, words):
    from worker.front.views import relative, when

    now_ms = 1_764_090_760_000
    assert relative(now_ms + int(offset_s * 1000), now_ms) == words
    assert when(now_ms + 240_000, now_ms) == "2025-11-25T17:16:40Z (in 4 min)"
    assert when(None, now_ms) == "-" and when("", now_ms) == "-"
