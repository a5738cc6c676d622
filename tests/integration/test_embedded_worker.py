"""The project's task in an embedded worker, with pytest-celery's fixtures: the same task code
as production, run by a worker thread of the test process, on a queue of its own so that the
session's subprocess worker does not take these messages.

pytest-celery's plugin imports ``celery.contrib.pytest``'s fixtures (``celery_config``,
``celery_session_app``, ``celery_session_worker``, ``celery_worker_pool``...), which run a worker
in a thread, without Docker; its own worker fixtures (``celery_worker`` & co.) build Docker
containers, and there is no Docker engine here, so they are not used. Signals, SIGKILL and
redelivery need real ``celery worker`` processes: the other tests start those.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

import pytest
from celery import Celery

import tasks
from tests.harness import Services, wait_for
from worker.queue.config import SEND_TASK, broker_options
from worker.queue.envelopes import Envelope
from worker.settings import load_settings

QUEUE = f"notify-embedded-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="session")
def celery_config(services: Services) -> Mapping[str, Any]:
    """The test app's broker: the run's Redis, through the project's transport; JSON only."""
    settings = load_settings(queue_name=QUEUE)
    return {
        "broker_url": settings.celery_broker_url,
        **broker_options(settings),
        "task_default_queue": QUEUE,
        "task_serializer": "json",
        "accept_content": ["json"],
    }


@pytest.fixture(scope="session")
def celery_worker_pool() -> str:
    """One task at a time, in the worker's own thread."""
    return "solo"


@pytest.fixture(scope="session")
def celery_includes() -> tuple[str, ...]:
    """The project's task module, and ``celery.ping``, which the worker's start-up check sends.

    ``@app.task`` tasks are shared: Celery registers them with every app, the test app too.
    """
    return ("tasks", "celery.contrib.testing.tasks")


@pytest.fixture(scope="session")
def celery_worker_parameters() -> Mapping[str, Any]:
    """This module's queue only."""
    return {"queues": (QUEUE,)}


def _send(runtime: Any, user_id: str, session: str) -> str:
    # Published as production publishes (the project's app), to the embedded worker's queue.
    request = {"userId": user_id, "sessionId": session, "templateId": "welcome", "context": {}}
    message_id = f"emb{uuid.uuid4().hex[:16]}"
    runtime.store.create(message_id, request)
    tasks.send_message.apply_async(args=[Envelope(message_id, 1, request).to_task()], queue=QUEUE)
    return message_id


def test_embedded_worker_delivers_and_dead_letters(
    celery_session_app: Celery, celery_session_worker: Any, runtime: Any, sandbox: Any, user_id: str
) -> None:
    assert SEND_TASK in celery_session_app.tasks  # the project's task, in the test app
    sandbox.script([{"status": 200}, {"status": 403}], user_id=user_id)
    delivered = _send(runtime, user_id, "one")
    wait_for(lambda: runtime.store.status(delivered)["state"] == "delivered")
    refused = _send(runtime, user_id, "two")
    wait_for(lambda: runtime.store.status(refused)["state"] == "failed")
    assert runtime.deadletters.get(refused).reason == "api_rejected"
    assert [r["status"] for r in sandbox.requests(user_id=user_id)] == [200, 403]
