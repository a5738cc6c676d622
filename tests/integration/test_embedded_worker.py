"""The task in an embedded worker (``celery.contrib.testing``, which pytest-celery carries): the
same app and task code as production, in a thread of the test process, on a queue of its own so
that the session's subprocess worker does not take these messages.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest

import tasks
from tests.harness import wait_for
from worker.queue.envelopes import Envelope

QUEUE = f"notify-embedded-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def embedded_worker() -> Iterator[Any]:
    """The product's own Celery app in a worker thread (``celery.contrib.testing.worker``).

    pytest-celery 1.x names its Docker-backed fixtures ``celery_worker`` & co., so the classic
    embedded worker they replace is started here directly, as the classic fixture did.
    """
    from celery.contrib.testing.worker import start_worker

    from worker.celery_app import app

    # No celery.ping task is registered; the consumer being up is enough.
    with start_worker(
        app, pool="threads", concurrency=4, queues=(QUEUE,), perform_ping_check=False
    ) as controller:
        yield controller


def _send(runtime: Any, user_id: str, session: str) -> str:
    request = {"userId": user_id, "sessionId": session, "templateId": "welcome", "context": {}}
    message_id = f"emb{uuid.uuid4().hex[:16]}"
    runtime.store.create(message_id, request)
    tasks.send_message.apply_async(args=[Envelope(message_id, 1, request).to_task()], queue=QUEUE)
    return message_id


def test_embedded_worker_delivers_and_dead_letters(embedded_worker, runtime, sandbox, user_id):
    sandbox.script([{"status": 200}, {"status": 403}], user_id=user_id)
    delivered = _send(runtime, user_id, "one")
    wait_for(lambda: runtime.store.status(delivered)["state"] == "delivered")
    refused = _send(runtime, user_id, "two")
    wait_for(lambda: runtime.store.status(refused)["state"] == "failed")
    assert runtime.deadletters.get(refused).reason == "api_rejected"
    assert [r["status"] for r in sandbox.requests(user_id=user_id)] == [200, 403]
