"""`notify flower` lists the tasks the pipeline runs (a real worker, a real Flower)."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT, free_port, wait_for
from tests.isolated import Isolated, isolated
from worker.processes import stop_processes

__all__ = ["isolated"]  # the fixture

NOTIFY = str(Path(sys.executable).parent / "notify")
AUTH = ("ops", "flower-test-password-91c")


class Flower:
    def __init__(self, port: int, log_path: Path, extra_env: dict[str, str]) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 (closed in stop)
        env = {
            **os.environ,
            **extra_env,
            "NOTIFY_FLOWER_BASIC_AUTH": ":".join(AUTH),
            "NOTIFY_FLOWER_COOKIE_SECRET": "cookie-secret-for-tests",
        }
        self.process = subprocess.Popen(
            [NOTIFY, "flower", "--port", str(port), "--address", "127.0.0.1"],
            cwd=ROOT,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def get(self, path: str, auth: tuple[str, str] | None = AUTH) -> httpx.Response:
        return httpx.get(self.url + path, auth=auth, timeout=5)

    def answers(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"flower exited:\n{self.log_path.read_text(errors='replace')}")
        try:
            return self.get("/healthcheck", auth=None).text == "OK"
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        stop_processes([self.process], grace_seconds=15)
        self._log.close()


@pytest.fixture
def flower(tmp_path: Path, isolated: Isolated) -> Iterator[Flower]:
    running = Flower(free_port(), tmp_path / "flower.log", isolated.env)
    try:
        wait_for(running.answers, timeout=30, interval=0.2, what="flower to answer")
        yield running
    finally:
        running.stop()


def _sees_worker(flower: Flower, name: str) -> bool:
    # Flower marks a worker online from its heartbeat events (every 2 s): once it does, its event
    # receiver is connected and will see our task's events too.
    return f'flower_worker_online{{worker="{name}@' in flower.get("/metrics", auth=None).text


def _task_states(flower: Flower) -> dict[str, dict[str, object]]:
    answer = flower.get("/api/tasks?limit=1000")
    answer.raise_for_status()
    result: dict[str, dict[str, object]] = answer.json()
    return result


def test_flower_lists_a_pipeline_task_as_succeeded_behind_basic_auth(
    start_worker, flower, isolated, user_id
):
    start_worker("flowerw", **isolated.env)
    wait_for(lambda: _sees_worker(flower, "flowerw"), timeout=30, interval=0.5, what="events")

    [message_id] = isolated.enqueue_many(
        [(user_id, f"s-{uuid.uuid4().hex[:8]}", "welcome", "https://app.example.com/x")]
    )
    wait_for(
        lambda: isolated.state(message_id) == "delivered",
        timeout=20,
        what="the message to be delivered",
    )

    def our_task() -> dict[str, object] | None:
        for task in _task_states(flower).values():
            if task.get("name") == "tasks.send_message" and message_id in str(task.get("args")):
                return task if task.get("state") == "SUCCESS" else None
        return None

    task = wait_for(our_task, timeout=20, interval=0.5, what="flower to list the task as SUCCESS")
    assert task["worker"].startswith("flowerw@")

    assert flower.get("/api/tasks", auth=None).status_code == 401
    assert flower.get("/api/tasks", auth=("ops", "wrong")).status_code == 401


def test_notify_flower_refuses_to_start_without_basic_auth():
    env = {k: v for k, v in os.environ.items() if not k.startswith("NOTIFY_FLOWER_")}
    done = subprocess.run(
        [NOTIFY, "flower", "--port", str(free_port())],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert done.stderr.startswith("error: NOTIFY_FLOWER_BASIC_AUTH")
