"""SIGTERM mid-flight: the worker finishes or hands back what it holds; nothing lost or doubled."""

from __future__ import annotations

import collections
import signal
import uuid

import pytest

from tests.harness import Isolated, wait_for

MESSAGES = 200
USERS = 10


@pytest.mark.slow
def test_sigterm_mid_flight_leaves_every_message_delivered_exactly_once(
    start_worker, isolated: Isolated, sandbox
):
    users = [f"user-{uuid.uuid4().hex[:10]}" for _ in range(USERS)]
    for user in users:
        # Slow answers (per user, not the sandbox's global latency) keep posts in flight.
        sandbox.script([], user_id=user, then={"status": 200, "delayMs": 500})
    # Two threads of 20 concurrent posts each: 40 in flight at a time, so 200 take five rounds
    # of half a second and the SIGTERM lands mid-run.
    first = start_worker("doomed", **isolated.env, NOTIFY_WORKER_CONCURRENCY="2")
    ids = isolated.enqueue_many(
        [
            (users[n % USERS], f"s-{n}-{uuid.uuid4().hex[:6]}", "welcome", None)
            for n in range(MESSAGES)
        ]
    )

    def delivered() -> int:
        return sum(isolated.state(message_id) == "delivered" for message_id in ids)

    wait_for(lambda: delivered() >= 10, timeout=30, what="the first deliveries")
    first.signal(signal.SIGTERM)
    assert first.process is not None
    first.process.wait(timeout=60)  # warm shutdown: the posts in flight finish first
    assert delivered() < MESSAGES, "the worker finished everything before the SIGTERM landed"

    start_worker("heir", **isolated.env)
    wait_for(lambda: delivered() == MESSAGES, timeout=120, interval=0.5, what="every delivery")

    posts = [r for user in users for r in sandbox.requests(user_id=user)]
    ok_per_session = collections.Counter(
        r["body"]["sessionId"] for r in posts if 200 <= r["status"] < 300
    )
    assert len(ok_per_session) == MESSAGES
    assert set(ok_per_session.values()) == {1}
    assert "Warm shutdown" in first.log()
