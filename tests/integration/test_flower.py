"""`notify flower` lists the tasks the pipeline runs (a real worker, a real Flower)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from sandbox.processes import stop_processes
from tests.harness import ROOT, Isolated, free_port, wait_for

NOTIFY = str(Path(sys.executable).parent / "notify")
AUTH = ("ops", "flower-test-password-91c")


class Flower:
    def __init__(
        self,
        port: int,
        log_path: Path,
        extra_env: dict[str, str],
        *args: str,
        script: bool = False,
    ) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 (closed in stop)
        env = {
            **os.environ,
            **extra_env,
            "NOTIFY_FLOWER_BASIC_AUTH": ":".join(AUTH),
            "NOTIFY_FLOWER_COOKIE_SECRET": "cookie-secret-for-tests",
        }
        argv = [NOTIFY, "flower", "--port", str(port), "--address", "127.0.0.1", *args]
        if script:  # the image's start script, with this venv's `notify` on the PATH
            env["PATH"] = f"{Path(NOTIFY).parent}{os.pathsep}{env['PATH']}"
            env["NOTIFY_FLOWER_PORT"] = str(port)
            argv = ["bash", str(ROOT / "docker" / "start-flower")]
        self.process = subprocess.Popen(
            argv,
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
    # No worker yet: start at once (the test starts its worker afterwards).
    running = Flower(free_port(), tmp_path / "flower.log", isolated.env, "--wait-for-worker", "0")
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


@pytest.mark.parametrize("script", [False, True], ids=["notify-flower", "docker-start-flower"])
def test_flower_waits_for_a_worker_to_answer_ping_and_its_first_look_lists_it(
    tmp_path, start_worker, isolated, script
):
    # As `make run` and compose start them: Flower first, the worker a moment later.
    log_path = tmp_path / "flower.log"
    flower = Flower(free_port(), log_path, isolated.env, script=script)
    try:
        wait_for(
            lambda: b"waiting for a worker to answer inspect ping" in log_path.read_bytes(),
            timeout=30,
            what="notify flower to wait for a worker",
        )
        assert not flower.answers()  # Flower itself has not started
        start_worker("firstlook", **isolated.env)
        wait_for(flower.answers, timeout=60, interval=0.2, what="flower to answer")

        def listed() -> list[str] | None:
            # refresh=0: what Flower learned on its own, without an operator's refresh.
            answer = flower.get("/api/workers?refresh=0")
            answer.raise_for_status()
            names = [name for name in answer.json() if name.startswith("firstlook@")]
            return names or None

        wait_for(listed, timeout=10, interval=0.2, what="flower's first look to list the worker")
        log = log_path.read_text(errors="replace")
        assert "a worker answered inspect ping (firstlook@" in log
        assert "Inspect method" not in log, log
        assert not re.search(r"^\[[WE] ", log, re.M), log  # no warning or error of Flower's
    finally:
        flower.stop()


def test_flower_without_a_worker_starts_after_the_wait_with_one_line_and_a_quiet_log(
    tmp_path, isolated
):
    log_path = tmp_path / "flower.log"
    args = ("--wait-for-worker", "1", "--log-level", "warning")
    flower = Flower(free_port(), log_path, isolated.env, *args)
    try:
        wait_for(flower.answers, timeout=30, interval=0.2, what="flower to answer")
        log = log_path.read_text(errors="replace")
        assert "no worker answered inspect ping in 1 s; starting Flower anyway" in log
        assert "Registered tasks" not in log and "Visit me" not in log  # --log-level warning
    finally:
        flower.stop()
