"""Waiting retries live in Redis's schedule, not in a worker's memory or the broker."""

from __future__ import annotations

import json
import threading
import time
from typing import Any
from unittest import mock

import pytest

import tasks
from tests.harness import Isolated, wait_for
from worker.queue.envelopes import Envelope
from worker.store import keys

pytestmark = pytest.mark.usefixtures("celery_worker_process")


def test_thousands_of_waiting_retries_are_held_in_redis_not_in_the_worker(
    runtime: Any, sandbox: Any, user_id: str
) -> None:
    from worker.celery_app import app

    count = 1000
    # Retry-After of an hour: longer than the broker's visibility timeout (30 s in the tests).
    sandbox.script([], user_id=user_id, then={"status": 503, "retryAfter": "3600"})
    ids = tasks.enqueue_many([(user_id, f"s{i}", "welcome", None) for i in range(count)])

    def all_in(state: str) -> bool:
        pipe = runtime.redis.pipeline(transaction=False)
        for message_id in ids:
            pipe.hget(keys.message(message_id), "state")
        return all(found == state for found in pipe.execute())

    wait_for(lambda: all_in("retrying"), timeout=90, interval=0.5, what="all waiting to retry")
    scores = runtime.redis.zmscore(keys.SCHEDULE, ids)
    assert all(score is not None and score > (time.time() + 3000) * 1000 for score in scores)
    # Nothing is held as an ETA task by the worker, nor waits on the broker's queue.
    inspector = app.control.inspect(timeout=2)
    held = inspector.scheduled() or {}
    assert all(not tasks_ for tasks_ in held.values())
    # The session's queue is shared with other tests: none of its tasks carries one of ours (a
    # task's argsrepr lists its message ids).
    mine = set(ids)
    queued = runtime.redis.lrange(runtime.settings.queue_name, 0, -1)
    carried = {
        ident.strip()
        for raw in queued
        for ident in json.loads(raw)["headers"]["argsrepr"].strip("[]").split(",")
    }
    assert not carried & mine
    assert len(sandbox.requests(user_id=user_id)) == count
    # When their hour is (brought forward and) up, the API answers again: all are delivered.
    sandbox.script([], user_id=user_id, then={"status": 200})
    runtime.redis.zadd(keys.SCHEDULE, dict.fromkeys(ids, 0))

    wait_for(lambda: all_in("delivered"), timeout=90, interval=0.5, what="all delivered")
    assert len(sandbox.requests(user_id=user_id)) == 2 * count


def test_a_task_lost_after_it_was_recorded_is_published_again_by_the_mover(
    runtime: Any, sandbox: Any, user_id: str
) -> None:
    # A producer that dies between recording and publishing: the record exists, no task does.
    request = {"userId": user_id, "sessionId": "lost", "templateId": "welcome", "context": {}}
    created, _ = runtime.store.create("lostmessage1", request)
    assert created
    # Its grace period is the visibility timeout; bring it forward instead of waiting 30 s.
    runtime.redis.zadd(keys.SCHEDULE, {"lostmessage1": 0})
    wait_for(lambda: runtime.store.status("lostmessage1")["state"] == "delivered")
    assert len(sandbox.requests(user_id=user_id)) == 1


def test_a_message_whose_worker_died_mid_attempt_is_taken_over_after_its_lease(
    runtime: Any, sandbox: Any, user_id: str
) -> None:
    request = {"userId": user_id, "sessionId": "orphan", "templateId": "welcome", "context": {}}
    runtime.store.create("orphanmessage1", request)
    # A worker claims it and dies before finishing: the claim leaves it in flight under a lease.
    claim = runtime.store.claim(
        Envelope("orphanmessage1", 1, request), owner="dead-worker", worker="gone", task_id="t"
    )
    assert claim.verdict == "go"
    # While the lease lasts, a copy of the task is refused (no double post).
    duplicate = runtime.store.claim(
        Envelope("orphanmessage1", 1, request), owner="other", worker="w", task_id="t2"
    )
    assert duplicate.verdict == "busy"
    # The lease ends (brought forward here): the mover hands it out and it is delivered.
    runtime.redis.hset(keys.message("orphanmessage1"), "lease", 0)
    runtime.redis.zadd(keys.SCHEDULE, {"orphanmessage1": 0})
    wait_for(lambda: runtime.store.status("orphanmessage1")["state"] == "delivered")
    record = runtime.store.status("orphanmessage1")
    assert record["attempt"] == "2"
    assert len(sandbox.requests(user_id=user_id)) == 1


def test_scripts_redis_forgot_are_loaded_again_and_the_outcome_is_recorded(runtime: Any) -> None:
    # What a Redis restart does to the script cache: the next claim and outcome still work,
    # on the same per-thread connection that speaks to Redis directly.
    from worker.store.records import MessageStore

    store = MessageStore(
        runtime.redis, publish_grace_seconds=3600, lease_seconds=60, status_ttl_seconds=600
    )
    message_id = f"flush-{time.time_ns()}"
    request = {"userId": "u", "sessionId": "s", "templateId": "welcome", "context": {}}
    assert store.create(message_id, request) == (True, "queued")
    runtime.redis.script_flush()
    claim = store.claim(Envelope(message_id, 1, request), owner="me", worker="w", task_id="t")
    assert (claim.verdict, claim.attempt) == ("go", 1)
    runtime.redis.script_flush()
    from worker.store.codec import AttemptRecord, now_ms

    assert store.delivered(message_id, AttemptRecord(1, now_ms(), "delivered", 200, None, 5, "c"))
    assert store.status(message_id)["state"] == "delivered"


def test_the_mover_stops_taking_due_messages_while_the_broker_is_away_and_loses_none(
    isolated: Isolated,
) -> None:
    from worker.delivery.mover import BATCH, BrokerAway, Mover
    from worker.queue.publisher import Publisher

    store = isolated.runtime.store
    count = BATCH + 100
    ids = [f"due-{n}" for n in range(count)]
    for message_id in ids:
        store.create(message_id, {"userId": "u", "sessionId": message_id, "templateId": "t"})
    isolated.runtime.redis.zadd(keys.SCHEDULE, dict.fromkeys(ids, 0))  # all due now
    broker_up = threading.Event()
    sent: list[str] = []

    def send(batch: list[Envelope]) -> None:
        if not broker_up.is_set():
            raise ConnectionError("broker down")
        sent.extend(envelope.id for envelope in batch)

    mover = Mover(store, Publisher(send, batch_size=50), interval_seconds=0.1)
    with mock.patch("worker.delivery.mover.FLUSH_SECONDS", 0.3), pytest.raises(BrokerAway):
        mover.run_once()
    # One batch taken (and held by the publisher); the rest still wait on the schedule.
    still_due = isolated.runtime.redis.zcount(keys.SCHEDULE, 0, time.time() * 1000)
    assert still_due == count - BATCH
    broker_up.set()
    assert mover.run_once() == count - BATCH
    assert mover.publisher.flush(10)
    assert sorted(sent) == sorted(ids)
