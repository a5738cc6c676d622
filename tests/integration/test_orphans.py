"""A task a worker popped off the queue and died before noting (kombu's window: ``BRPOP``, then
the ``MULTI`` that writes ``unacked`` and the held set) comes back after the takeover, not after
the publish grace (worker/delivery/mover.py, ``Liveness.audit_orphans``; orphans.lua).

On real Redis, with a producer process publishing real tasks onto the broker's list: the dying
worker's pop is an ``RPOP`` of the oldest task, as kombu's ``BRPOP`` takes it, and the worker it
was is a heartbeat that stopped.
"""

from __future__ import annotations

import base64
import json
import time
from typing import Any

from tests.harness import Isolated
from tests.reconcile import requests_for
from worker.delivery.mover import Liveness
from worker.store import keys
from worker.store.codec import now_ms

MARGIN_SECONDS = 1.0


def _ids_of(raw: str) -> list[str]:
    # kombu's message as stored on the list: the body is Celery's [args, kwargs, embed], base64.
    body = json.loads(base64.b64decode(json.loads(raw)["body"]))
    return [envelope["id"] for envelope in body[0]]


def _liveness(isolated: Isolated, name: str = "live-host:1") -> Liveness:
    runtime = isolated.runtime
    queue = isolated.env["NOTIFY_QUEUE_NAME"]
    liveness = Liveness(
        runtime.redis,
        name,
        grace_ms=runtime.store.publish_grace_ms,
        store=runtime.store,
        oldest_task=lambda: runtime.redis.lindex(queue, -1),
        dead_after_seconds=0.001,
        orphan_margin_seconds=MARGIN_SECONDS,
    )
    liveness.tick()  # its first heartbeat: a worker judges others once it has been alive a while
    time.sleep(0.01)
    return liveness


def _a_worker_died(isolated: Isolated, name: str = "dead-host:7") -> None:
    # Its last heartbeat a minute ago, nothing in its held set: killed between pop and note.
    isolated.runtime.redis.zadd(keys.WORKERS, {name: now_ms() - 60_000})


def _due_now(isolated: Isolated, ids: list[str]) -> set[str]:
    redis = isolated.runtime.redis
    now = now_ms()
    return {
        i for i in ids if (score := redis.zscore(keys.SCHEDULE, i)) is not None and score <= now
    }


def _publish(isolated: Isolated, count: int) -> list[str]:
    ids = isolated.enqueue_many(requests_for(count, users=5))
    assert len(ids) == count
    return ids


def test_a_task_popped_by_a_worker_killed_before_noting_it_comes_back_after_the_takeover(
    isolated: Isolated,
):
    redis = isolated.runtime.redis
    queue = isolated.env["NOTIFY_QUEUE_NAME"]
    lost = _publish(isolated, 20)
    time.sleep(MARGIN_SECONDS + 0.5)  # the rest published later than the margin
    waiting = _publish(isolated, 20)
    assert redis.llen(queue) == 2
    # The dying worker's pop takes the oldest task; the process dies before noting it.
    popped = redis.rpop(queue)
    assert sorted(_ids_of(popped)) == sorted(lost)
    liveness = _liveness(isolated)
    _a_worker_died(isolated)

    taken = liveness.tick()

    assert taken == 20
    assert _due_now(isolated, lost) == set(lost), "the lost task's messages are due at once"
    assert _due_now(isolated, waiting) == set(), "the task still on the queue is left there"
    # The mover publishes them as it publishes any message due.
    assert {envelope.id for envelope in isolated.runtime.store.due(100)} == set(lost)
    # Still open: the queue has not yet moved past the takeover.
    assert redis.exists(keys.ORPHAN_AUDIT)


def test_the_audit_leaves_what_live_workers_hold_and_ends_once_the_queue_moved_past(
    isolated: Isolated,
):
    redis = isolated.runtime.redis
    queue = isolated.env["NOTIFY_QUEUE_NAME"]
    held = _publish(isolated, 20)
    liveness = _liveness(isolated)
    _a_worker_died(isolated)
    # A live worker takes the task and notes its messages (the MULTI of worker/queue/broker.py).
    assert sorted(_ids_of(redis.rpop(queue))) == sorted(held)
    liveness.hold(held)
    time.sleep(MARGIN_SECONDS + 0.5)  # the queue, empty, has moved past the messages

    assert liveness.tick() == 0
    assert _due_now(isolated, held) == set()
    # It ends once the queue has moved past the takeover (the margin after it, the queue empty).
    deadline = time.monotonic() + 10 * MARGIN_SECONDS
    while redis.exists(keys.ORPHAN_AUDIT) and time.monotonic() < deadline:
        time.sleep(0.2)
        liveness.tick()
    assert not redis.exists(keys.ORPHAN_AUDIT)
    assert _due_now(isolated, held) == set()


def test_without_a_takeover_nothing_is_audited(isolated: Isolated):
    redis = isolated.runtime.redis
    queue = isolated.env["NOTIFY_QUEUE_NAME"]
    ids = _publish(isolated, 20)
    redis.rpop(queue)  # taken off the queue and not noted, but no worker died
    time.sleep(MARGIN_SECONDS + 0.5)
    liveness = _liveness(isolated)

    assert liveness.tick() == 0
    assert isolated.runtime.store.publish_orphans(cutoff_ms=now_ms(), live_since_ms=0) == (
        -1,
        False,
    )
    assert _due_now(isolated, ids) == set()


def test_a_task_without_the_published_header_at_the_head_holds_the_audit(isolated: Isolated):
    # A hand-made task (or one published before the header existed) does not say how far the
    # queue has gone: nothing is taken for lost until it has left the queue.
    redis = isolated.runtime.redis
    queue = isolated.env["NOTIFY_QUEUE_NAME"]
    lost = _publish(isolated, 20)
    redis.rpop(queue)
    raw: dict[str, Any] = {"body": "", "headers": {"task": "x"}, "properties": {}}
    redis.lpush(queue, json.dumps(raw))
    time.sleep(MARGIN_SECONDS + 0.5)
    liveness = _liveness(isolated)
    _a_worker_died(isolated)

    assert liveness.tick() == 0
    assert _due_now(isolated, lost) == set()
    redis.delete(queue)
    assert liveness.tick() == 20
    assert _due_now(isolated, lost) == set(lost)


def test_a_pass_goes_through_the_schedule_in_chunks_and_finds_every_orphan(isolated: Isolated):
    # Redis runs nothing else while a script runs: a large schedule is looked at a chunk a call.
    redis = isolated.runtime.redis
    queue = isolated.env["NOTIFY_QUEUE_NAME"]
    # Three batches, each created together (one score on the schedule for its 20 messages).
    lost = [i for _ in range(3) for i in _publish(isolated, 20)]
    while redis.rpop(queue):  # three tasks, each popped by a worker that died before noting it
        pass
    # A task that does not say when it was published keeps the takeover's audit from its pass.
    redis.lpush(queue, json.dumps({"body": "", "headers": {"task": "x"}, "properties": {}}))
    time.sleep(MARGIN_SECONDS + 0.5)
    liveness = _liveness(isolated)
    _a_worker_died(isolated)
    assert liveness.tick() == 0
    assert redis.exists(keys.ORPHAN_AUDIT)
    redis.delete(queue)

    calls: list[int] = []
    more = True
    while more:
        found, more = isolated.runtime.store.publish_orphans(
            cutoff_ms=now_ms() - int(MARGIN_SECONDS * 1000), live_since_ms=0, chunk=7
        )
        calls.append(found)
        assert len(calls) < 50
    # A chunk of 7 entries, and the rest of its last score: one batch a call, whole.
    assert [found for found in calls if found] == [20, 20, 20]
    assert _due_now(isolated, lost) == set(lost)
