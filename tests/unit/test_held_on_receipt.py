"""A worker notes a received send task's messages as held in the pipeline that records the task
in kombu's ``unacked`` (worker/queue/broker.py, worker/celery_app.py), and nothing else."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

from worker import celery_app
from worker.queue.config import SEND_TASK
from worker.runtime import get_runtime
from worker.store import keys


class Pipe:
    """Stands in for the redis-py pipeline: records what is added to it."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []

    def sadd(self, key: str, *members: Any) -> None:
        self.calls.append((key, members))


def _message(body: Any, task: str = SEND_TASK) -> SimpleNamespace:
    return SimpleNamespace(headers={"task": task}, body=body)


def test_a_send_tasks_messages_are_noted_as_held_in_the_same_pipeline() -> None:
    pipe = Pipe()
    envelopes = [{"id": "m-1", "gen": 1, "req": {}}, {"id": "m-2", "gen": 3, "req": {}}]
    celery_app._note_received(pipe, _message(json.dumps([envelopes, {}, {}])))
    assert pipe.calls == [(keys.held(get_runtime().worker_name), ("m-1", "m-2"))]


def test_other_tasks_and_bodies_that_are_no_task_note_nothing() -> None:
    pipe = Pipe()
    celery_app._note_received(pipe, _message(json.dumps([[{"id": "x"}], {}, {}]), task="other"))
    celery_app._note_received(pipe, _message(b"\xff not json"))
    celery_app._note_received(pipe, _message(json.dumps({"not": "a list"})))
    celery_app._note_received(pipe, _message(json.dumps([["not an envelope"], {}, {}])))
    celery_app._note_received(pipe, SimpleNamespace(headers=None, body=b"[]"))
    assert pipe.calls == []
