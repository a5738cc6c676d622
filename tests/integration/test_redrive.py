"""Filtered, paced and dry-run redrive of dead letters: the schedule's arithmetic, and the CLI
and the HTTP service over real Redis."""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from typing import Any

import httpx
import pytest

from tests.harness import OPERATOR_KEY, ROOT, Isolated, ServerThread, app_settings, wait_for
from worker.front.api import create_app
from worker.shapes.models import Message
from worker.store import keys
from worker.store.codec import Failure
from worker.store.deadletters import DeadLetterFilter, redrive_schedule

NOTIFY = str(ROOT / ".venv" / "bin" / "notify")


def test_an_unpaced_redrive_goes_in_whole_chunks_at_once() -> None:
    ids = [f"m{n}" for n in range(450)]
    plan = list(redrive_schedule(ids, None, 200))
    assert [len(chunk) for _, chunk in plan] == [200, 200, 50]
    assert {due for due, _ in plan} == {0.0}


def test_a_paced_redrive_never_runs_ahead_of_its_rate() -> None:
    ids = [f"m{n}" for n in range(30)]
    plan = list(redrive_schedule(ids, 10.0, 200))
    assert [len(chunk) for _, chunk in plan] == [2] * 15  # a fifth of a second's worth
    for due, chunk in plan:
        first = ids.index(chunk[0])
        assert due == pytest.approx(first / 10.0)  # the ids before it used their share
    slow = list(redrive_schedule(ids[:3], 0.5, 200))
    assert [(due, len(chunk)) for due, chunk in slow] == [(0.0, 1), (2.0, 1), (4.0, 1)]
    with pytest.raises(ValueError):
        list(redrive_schedule(ids, 0.0, 200))


def _letters(rt: Any, count: int, *, reason: str, status: int | None, template: str) -> list[str]:
    ids = []
    for n in range(count):
        message = Message.create(f"rd-{uuid.uuid4().hex[:8]}", f"s{n}", template)
        rt.store.create(message.id, message.to_wire())
        rt.store.dead_letter(message.id, Failure(reason, "made by the test", status=status))
        ids.append(message.id)
    return ids


def _notify(isolated: Isolated, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [NOTIFY, *args],
        cwd=ROOT,
        env={**os.environ, **isolated.env},
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _state(rt: Any, message_id: str) -> str:
    return str(rt.redis.hget(keys.message(message_id), "state"))


def test_filters_select_by_http_status_and_time_range(isolated: Isolated) -> None:
    rt = isolated.runtime
    rejected = _letters(rt, 3, reason="api_rejected", status=404, template="welcome")
    time.sleep(0.05)
    middle = int(time.time() * 1000)
    time.sleep(0.05)
    exhausted = _letters(rt, 2, reason="retries_exhausted", status=503, template="welcome")
    store = rt.deadletters
    assert sorted(store.select(DeadLetterFilter(http_status=404))) == sorted(rejected)
    assert sorted(store.select(DeadLetterFilter(until_ms=middle))) == sorted(rejected)
    assert sorted(store.select(DeadLetterFilter(since_ms=middle))) == sorted(exhausted)
    assert store.select(DeadLetterFilter(http_status=503, until_ms=middle)) == []


def test_cli_dry_run_counts_and_changes_nothing_then_a_paced_replay_keeps_its_rate(
    isolated: Isolated,
) -> None:
    rt = isolated.runtime
    ids = _letters(rt, 12, reason="retries_exhausted", status=503, template="welcome")
    _letters(rt, 4, reason="api_rejected", status=400, template="welcome")

    dry = _notify(isolated, "failed", "replay", "--all", "--http-status", "503", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.strip() == "would replay 12"
    assert {_state(rt, i) for i in ids} == {"failed"}
    assert rt.deadletters.count() == 16

    started = time.monotonic()
    paced = _notify(
        isolated, "failed", "replay", "--all", "--reason", "retries_exhausted", "--rate", "10"
    )
    took = time.monotonic() - started
    assert paced.returncode == 0, paced.stderr
    assert paced.stdout.strip() == "replayed 12"
    assert {_state(rt, i) for i in ids} == {"queued"}
    assert rt.deadletters.count() == 4  # the other reason's letters stay
    # 12 at 10 a second, two at a time: the last pair goes 1.0 s after the first.
    replayed_at = sorted(int(rt.redis.hget(keys.message(i), "updated")) for i in ids)
    assert replayed_at[-1] - replayed_at[0] >= 900, replayed_at
    assert took >= 1.0


def test_bulk_delete_asks_first_and_dry_run_deletes_nothing(isolated: Isolated) -> None:
    rt = isolated.runtime
    _letters(rt, 3, reason="api_rejected", status=400, template="welcome")
    kept = _letters(rt, 2, reason="api_rejected", status=400, template="reminder")

    dry = _notify(isolated, "failed", "delete", "--all", "--template", "welcome", "--dry-run")
    assert dry.stdout.strip() == "would delete 3"
    declined = _notify(isolated, "failed", "delete", "--all", "--template", "welcome", stdin="n\n")
    assert declined.returncode != 0
    assert "delete 3 dead letters for good?" in declined.stdout
    assert rt.deadletters.count() == 5
    agreed = _notify(isolated, "failed", "delete", "--all", "--template", "welcome", stdin="y\n")
    assert agreed.returncode == 0, agreed.stderr
    assert agreed.stdout.strip().endswith("deleted 3")
    assert sorted(rt.deadletters.select(DeadLetterFilter())) == sorted(kept)
    assert _notify(isolated, "failed", "delete", "--all", "--yes").stdout.strip() == "deleted 2"


def test_http_replay_takes_filters_a_dry_run_and_a_rate(isolated: Isolated) -> None:
    rt = isolated.runtime
    wanted = _letters(rt, 6, reason="retries_exhausted", status=503, template="welcome")
    other = _letters(rt, 2, reason="retries_exhausted", status=502, template="welcome")
    headers = {"Authorization": f"Bearer {OPERATOR_KEY}"}
    with (
        ServerThread(create_app(app_settings(), rt)) as server,
        httpx.Client(base_url=server.url, headers=headers, timeout=30) as http,
    ):
        dry = http.post("/notifications/replay", params={"httpStatus": "503", "dryRun": "true"})
        assert dry.status_code == 200
        assert dry.json()["count"] == 6 and sorted(dry.json()["ids"]) == sorted(wanted)
        assert rt.deadletters.count() == 8
        for bad in ({"rate": "0"}, {"rate": "fast"}, {"httpStatus": "99"}, {"until": "x"}):
            assert http.post("/notifications/replay", params=bad).status_code == 400, bad
        paced = http.post("/notifications/replay", params={"httpStatus": "503", "rate": "20"})
        assert paced.status_code == 202
        assert paced.json()["count"] == 6 and paced.json()["ratePerSecond"] == 20
        wait_for(
            lambda: {_state(rt, i) for i in wanted} == {"queued"},
            timeout=10,
            what="the paced redrive",
        )
    assert {_state(rt, i) for i in other} == {"failed"}
