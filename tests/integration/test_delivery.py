"""A task's batch on real Redis and the loopback sandbox: posts overlap, outcomes stay apart."""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

import pytest

from tests.harness import Isolated
from worker.delivery.attempts import deliver_task
from worker.queue.envelopes import Envelope
from worker.runtime import Runtime
from worker.settings import load_settings
from worker.shapes.models import Message
from worker.store import keys


def _batch(rt: Any, users: list[str]) -> list[Envelope]:
    messages = [Message.create(user, f"s-{uuid.uuid4().hex[:8]}", "welcome") for user in users]
    rt.store.create_many([(m.id, m.to_wire()) for m in messages])
    return [Envelope(m.id, 1, m.to_wire()) for m in messages]


def _deliver(rt: Any, envelopes: list[Envelope], **kwargs: Any) -> str:
    return deliver_task(
        tuple(e.to_task() for e in envelopes), {}, parts=rt, task_id="task-1", **kwargs
    )


def test_a_batch_of_20_at_250_ms_finishes_in_well_under_20_posts_time(
    isolated: Isolated, sandbox
) -> None:
    user = f"user-{uuid.uuid4().hex[:10]}"
    sandbox.script([], user_id=user, then={"status": 200, "delayMs": 250})
    rt = isolated.runtime
    envelopes = _batch(rt, [user] * 20)
    started = time.perf_counter()
    verdict = _deliver(rt, envelopes)
    elapsed = time.perf_counter() - started
    assert verdict == "delivered=20"
    assert elapsed < 1.5, f"20 posts of 250 ms took {elapsed:.2f}s (one after another: 5 s)"
    assert {isolated.state(e.id) for e in envelopes} == {"delivered"}
    assert len(sandbox.requests(user_id=user)) == 20


def test_each_outcome_is_written_when_its_own_answer_arrives(isolated: Isolated, sandbox) -> None:
    slow, fast = f"slow-{uuid.uuid4().hex[:8]}", f"fast-{uuid.uuid4().hex[:8]}"
    sandbox.script([], user_id=slow, then={"status": 200, "delayMs": 800})
    sandbox.script([], user_id=fast, then={"status": 503, "delayMs": 50})
    # The tests' 1 s HTTP deadline is too close to the slow answer's 800 ms on a busy machine
    # (CI once saw it time out): this runtime waits 5 s, so only the order of answers matters.
    rt = Runtime.from_settings(
        load_settings(
            redis_url=isolated.env["NOTIFY_REDIS_URL"],
            queue_name=isolated.env["NOTIFY_QUEUE_NAME"],
            http_timeout_seconds=5,
        )
    )
    envelopes = _batch(rt, [slow] + [fast] * 9)
    try:
        verdict = _deliver(rt, envelopes)
        records = [rt.store.status(e.id) for e in envelopes]
    finally:
        rt.close()
    assert verdict == "delivered=1 retry=9"
    slow_done = int(records[0]["updated"]) - int(records[0]["created"])
    fast_done = [int(r["updated"]) - int(r["created"]) for r in records[1:]]
    assert slow_done >= 800
    # The 503s were scheduled for retry at once, not after the batch's slowest post.
    assert max(fast_done) < 400, fast_done
    assert {r["state"] for r in records[1:]} == {"retrying"}


def test_a_warm_shutdown_mid_batch_hands_back_unposted_messages_without_spending_an_attempt(
    isolated: Isolated, sandbox
) -> None:
    user = f"user-{uuid.uuid4().hex[:10]}"
    rt = isolated.runtime
    envelopes = _batch(rt, [user] * 20)
    calls = {"n": 0}

    def stopping() -> bool:
        # Asked once before the batch is claimed, then before each post: SIGTERM after 5 posts.
        calls["n"] += 1
        return calls["n"] > 6

    assert _deliver(rt, envelopes, stopping=stopping) == "delivered=5 handed_back=15"
    handed_back = [rt.store.status(e.id) for e in envelopes[5:]]
    assert {r["state"] for r in handed_back} == {"retrying"}
    assert {r["attempt"] for r in handed_back} == {"0"}, "a handed-back message spent an attempt"
    due = rt.redis.zmscore(keys.SCHEDULE, [e.id for e in envelopes[5:]])
    assert all(score is not None and score <= time.time() * 1000 for score in due)
    assert len(sandbox.requests(user_id=user)) == 5


def test_a_first_401_is_answered_by_one_refresh_and_one_more_post_each(
    isolated: Isolated, sandbox
) -> None:
    users = [f"user-{uuid.uuid4().hex[:10]}" for _ in range(3)]
    for user in users:
        sandbox.script([{"status": 401}], user_id=user)
    rt = isolated.runtime
    envelopes = _batch(rt, users)
    assert _deliver(rt, envelopes) == "delivered=3"
    for user, envelope in zip(users, envelopes, strict=True):
        assert [r["status"] for r in sandbox.requests(user_id=user)] == [401, 200]
        record = rt.store.status(envelope.id)
        assert record["attempt"] == "1"  # the refreshed post belongs to the same attempt


def test_each_attempts_log_line_carries_the_partner(
    isolated: Isolated, sandbox, caplog: pytest.LogCaptureFixture
) -> None:
    user = f"user-{uuid.uuid4().hex[:10]}"
    sandbox.script([{"status": 503}], user_id=user)
    rt = isolated.runtime
    messages = [Message.create(user, f"s-{n}", "welcome", partner="acme") for n in range(2)]
    rt.store.create_many([(m.id, m.to_wire()) for m in messages])
    envelopes = [Envelope(m.id, 1, m.to_wire()) for m in messages]
    with caplog.at_level(logging.INFO, logger="notify.delivery"):
        assert _deliver(rt, envelopes) == "delivered=1 retry=1"
    lines = [r for r in caplog.records if getattr(r, "outcome", None) in ("delivered", "retry")]
    assert sorted(r.outcome for r in lines) == ["delivered", "retry"]  # type: ignore[attr-defined]
    assert {r.partner for r in lines} == {"acme"}  # type: ignore[attr-defined]
