"""Operators' counts with a real worker: `notify stats` and `/metrics` report what happened."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families

import tasks
from tests.harness import Isolated, wait_for
from worker.front.cli import main
from worker.front.stats import Stats, build, collect, queue_lists, render_prometheus
from worker.rules import outcomes
from worker.runtime import Runtime
from worker.settings import load_settings
from worker.store import keys

pytestmark = pytest.mark.usefixtures("celery_worker_process")


def _state(runtime: Any, message_id: str) -> str | None:
    record = runtime.store.status(message_id)
    return record["state"] if record else None


def _send(user_id: str, **kw: Any) -> str:
    session = f"s-{uuid.uuid4().hex[:8]}"
    return tasks.enqueue(user_id, session, "welcome", kw.get("url"), runtime=kw.get("runtime"))


def _scanned_truth(runtime: Any) -> tuple[Counter[str], int, int]:
    """Dead letters by reason, retrying and in-flight messages, counted the slow way."""
    letters = runtime.deadletters.page(limit=100_000).items
    by_reason = Counter(letter.reason for letter in letters)
    members = runtime.redis.zrange(keys.SCHEDULE, 0, -1)
    pipe = runtime.redis.pipeline(transaction=False)
    for message_id in members:
        pipe.hget(keys.message(message_id), "state")
    states = Counter(pipe.execute())
    return by_reason, states["retrying"], states["inflight"]


def _gauges_match_a_full_scan(runtime: Any) -> bool:
    snapshot = collect(runtime)
    by_reason, retrying, inflight = _scanned_truth(runtime)
    return (
        {r: n for r, n in snapshot.dead_letters.items() if n} == dict(by_reason)
        and snapshot.dead_letters_total == sum(by_reason.values())
        and snapshot.retry_waiting == retrying
        and snapshot.inflight == inflight
    )


def test_build_turns_raw_replies_into_counts_and_never_shows_a_negative_gauge() -> None:
    stats = build(
        at_ms=120_000,
        queue="q",
        queue_lengths=[3, 0, "2", None],
        reserved="4",
        live={"inflight": "2", "retrying": "-1", "dead:api_rejected": "5", "dead:new_reason": "1"},
        totals={"delivered": "10", "dead:api_rejected": "6", "retried": "x"},
        dead_index_size=6,
        minute_counts=[(1, "7"), (2, None)],
        penalty="2.0",
    )
    assert (stats.queued, stats.reserved, stats.inflight, stats.retry_waiting) == (5, 4, 2, 0)
    assert stats.dead_letters["api_rejected"] == 5 and stats.dead_letters["new_reason"] == 1
    assert set(outcomes.REASONS) <= set(stats.dead_letters)  # stable label set, zeros included
    assert stats.totals["delivered"] == 10 and stats.totals["retried"] == 0
    assert stats.totals["dead_lettered"] == 6
    assert stats.delivered_last_minute == 7
    assert stats.rate_limit_penalty_factor == 2.0
    assert queue_lists("q")[0] == "q" and len(queue_lists("q")) == 4


def test_counts_follow_deliveries_retries_and_dead_letters(
    isolated: Isolated, start_worker: Any, sandbox: Any
) -> None:
    # A database and worker of its own: the counts are the database's, and the session worker
    # finishes other tests' messages (a retry, a dead letter) while this one counts.
    runtime = isolated.runtime
    start_worker("stats", **isolated.env)
    wait_for(lambda: _gauges_match_a_full_scan(runtime), what="a quiet start")
    before = collect(runtime, minutes=120)
    ok_user, rejected_user, exhausted_user, waiting_user = (
        f"stats-{kind}-{uuid.uuid4().hex[:6]}" for kind in ("ok", "rej", "exh", "wait")
    )
    sandbox.script([{"status": 400}], user_id=rejected_user)
    sandbox.script(then={"status": 503}, user_id=exhausted_user)
    sandbox.script([{"status": 503, "retryAfter": "120"}], user_id=waiting_user)

    delivered = [_send(ok_user, runtime=runtime) for _ in range(5)]
    rejected = _send(rejected_user, runtime=runtime)
    exhausted = _send(exhausted_user, runtime=runtime)
    waiting = _send(waiting_user, runtime=runtime)
    wait_for(
        lambda: (
            all(_state(runtime, i) == "delivered" for i in delivered)
            and _state(runtime, rejected) == "failed"
            and _state(runtime, exhausted) == "failed"
            and _state(runtime, waiting) == "retrying"
        ),
        timeout=30,
        what="the messages to reach their states",
    )
    after = collect(runtime, minutes=120)

    assert after.totals["delivered"] - before.totals["delivered"] == 5
    per_minute = sum(m.delivered for m in after.delivered_per_minute) - sum(
        m.delivered for m in before.delivered_per_minute
    )
    assert per_minute == 5
    assert after.dead_letters["api_rejected"] - before.dead_letters["api_rejected"] == 1
    assert after.dead_letters["retries_exhausted"] - before.dead_letters["retries_exhausted"] == 1
    assert after.dead_letters_total - before.dead_letters_total == 2
    assert after.retry_waiting - before.retry_waiting == 1
    assert after.totals["retried"] - before.totals["retried"] >= 3  # 2 for exhausted, 1 waiting
    assert wait_for(lambda: _gauges_match_a_full_scan(runtime), what="gauges to match a scan")

    # Replaying and deleting dead letters take them out of the gauges at once.
    runtime.deadletters.replay(rejected)
    assert runtime.deadletters.delete(exhausted)
    now = collect(runtime, minutes=120)
    assert now.dead_letters["api_rejected"] == before.dead_letters["api_rejected"]
    assert now.dead_letters["retries_exhausted"] == before.dead_letters["retries_exhausted"]
    wait_for(lambda: _state(runtime, rejected) == "delivered", what="the replay to deliver")
    assert wait_for(lambda: _gauges_match_a_full_scan(runtime), what="gauges after replay")


def test_a_message_being_posted_counts_as_in_flight(runtime: Any, sandbox: Any) -> None:
    slow_user = f"stats-slow-{uuid.uuid4().hex[:6]}"
    sandbox.script([{"status": 200, "delayMs": 800}], user_id=slow_user)
    message_id = _send(slow_user)
    wait_for(lambda: collect(runtime).inflight >= 1, timeout=10, what="an in-flight count")
    wait_for(lambda: _state(runtime, message_id) == "delivered", what="the slow delivery")
    wait_for(lambda: _gauges_match_a_full_scan(runtime), what="in flight back to the truth")


def test_queued_is_the_broker_queue_length_in_tasks() -> None:
    # A queue no worker consumes: what is published stays in the broker's list. Messages
    # published together travel together, up to NOTIFY_BATCH_SIZE to a task.
    idle = Runtime.from_settings(
        # Published at intake (fifo), so the queue holds them with no dispatcher running.
        load_settings(
            queue_name=f"notify-test-idle-{uuid.uuid4().hex}", batch_size=2, dispatch="fifo"
        )
    )
    try:
        assert collect(idle).queued == 0
        tasks.enqueue_many(
            [(f"stats-q-{uuid.uuid4().hex[:6]}", f"s-{n}", "welcome", None) for n in range(5)],
            runtime=idle,
        )
        assert idle.publisher.flush()  # enqueue_many returns once they are recorded
        assert collect(idle).queued == 3
    finally:
        idle.redis.delete(*queue_lists(idle.settings.queue_name))
        idle.close()


def _comparable(data: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in data.items() if k not in ("at_ms", "delivered_per_minute")}


def test_notify_stats_json_matches_collect(isolated: Isolated) -> None:
    # A database of its own, with a few records, so nothing else moves the counts between the
    # command's reading and ours.
    tasks.enqueue_many(
        [(f"stats-j-{uuid.uuid4().hex[:6]}", f"s-{n}", "welcome", None) for n in range(3)],
        runtime=isolated.runtime,
    )
    result = subprocess.run(
        [str(Path(sys.executable).with_name("notify")), "stats", "--json", "--minutes", "5"],
        env={**os.environ, **isolated.env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    printed = json.loads(result.stdout)
    assert _comparable(printed) == _comparable(collect(isolated.runtime, minutes=5).to_dict())
    assert printed["queued"] == 1  # one task of three on the queue, no worker to take it
    assert len(printed["delivered_per_minute"]) == 5
    table = CliRunner().invoke(main, ["stats"])
    assert table.exit_code == 0 and "waiting for retry" in table.output


def test_prometheus_exposition_parses_and_carries_the_counts(runtime: Any) -> None:
    stats: Stats = collect(runtime)
    text = render_prometheus(stats)
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ("notify_queued", "notify_retry_waiting", "notify_inflight", "notify_dead_letters"):
        assert families[name].type == "gauge" and families[name].documentation
    assert families["notify_delivered"].type == "counter"  # the parser drops "_total"
    assert families["notify_delivered"].samples[0].value == stats.totals["delivered"]
    dead = {s.labels["reason"]: s.value for s in families["notify_dead_letters"].samples}
    assert dead == {r: float(n) for r, n in stats.dead_letters.items()}
    assert families["notify_retry_waiting"].samples[0].value == stats.retry_waiting
    queued = families["notify_queued"].samples[0]
    assert queued.labels == {"queue": runtime.settings.queue_name}
