"""A worker notes a received send task's messages as held in the pipeline that records the task
in kombu's ``unacked`` (worker/queue/broker.py, worker/celery_app.py), and nothing else."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

from worker import celery_app
from worker.queue.config import SEND_TASK
from worker.queue.envelopes import PUBLISHED_MS_HEADER, published_ms_of
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


def test_when_a_task_was_published_is_read_from_its_header_on_the_broker_list() -> None:
    stored = {"body": "W10=", "headers": {"task": SEND_TASK, PUBLISHED_MS_HEADER: 1_700_000}}
    assert published_ms_of(json.dumps(stored)) == 1_700_000
    assert published_ms_of(json.dumps(stored).encode()) == 1_700_000


def test_a_task_that_does_not_say_when_it_was_published_gives_none() -> None:
    for raw in (
        json.dumps({"body": "W10=", "headers": {"task": SEND_TASK}}),
        json.dumps({"headers": {PUBLISHED_MS_HEADER: "1700000"}}),
        json.dumps({"headers": {PUBLISHED_MS_HEADER: True}}),
        json.dumps({"headers": {PUBLISHED_MS_HEADER: -5}}),
        json.dumps([1, 2]),
        "not json",
        b"\xff\xfe",
    ):
        assert published_ms_of(raw) is None, raw
