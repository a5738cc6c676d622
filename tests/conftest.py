"""Fixtures of every tier; the machinery behind them is in ``tests/harness.py``.

The unit tier runs on settings alone (``harness.static_environment``: Redis and Concur point
where nothing answers). The integration and faults tiers start a real Redis and the sandbox
in their own conftest (``harness.start_services``); a fixture below that needs them starts them
too, so a module outside those folders that asks for ``runtime`` still gets them.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings as hypothesis_settings
from redis import Redis

from sandbox.concur import Sandbox
from sandbox.processes import stop_processes
from tests import harness
from tests.harness import (
    ROOT,
    TEST_TOKEN,
    Isolated,
    ServerThread,
    Services,
    WorkerProcess,
    free_port,
    wait_for,
)


def pytest_configure(config: pytest.Config) -> None:
    harness.configure_environment()
    # Hypothesis's 200 ms per-example deadline is a real-clock race on a busy machine (a unit
    # test failed on it at load average 50): examples are bounded by their count instead.
    hypothesis_settings.register_profile("notify", deadline=None)
    hypothesis_settings.load_profile("notify")


def pytest_unconfigure(config: pytest.Config) -> None:
    harness.stop_services()


@pytest.fixture(scope="session")
def services() -> Services:
    """The run's Redis database and sandbox (started once, stopped at the end of the run)."""
    return harness.start_services()


@pytest.fixture(scope="session")
def sandbox(services: Services) -> Sandbox:
    """The loopback stand-in for Concur (shared; tests tell apart their own users)."""
    return services.sandbox


@pytest.fixture
def user_id() -> str:
    """A user id of this test's own, so the shared sandbox's record can be read per test."""
    return f"user-{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="session")
def runtime(services: Services) -> Any:
    """The test process's runtime (same settings as the workers)."""
    from worker.runtime import get_runtime

    return get_runtime()


@pytest.fixture(scope="session")
def worker_logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("workers")


@pytest.fixture(scope="session")
def celery_worker_process(services: Services, worker_logs: Path) -> Iterator[WorkerProcess]:
    """One real worker for the whole session (the mover runs inside it)."""
    worker = WorkerProcess("main", worker_logs).start()
    yield worker
    worker.stop()


@pytest.fixture
def start_worker(services: Services, worker_logs: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """Start extra workers for one test; they are stopped after it."""
    started: list[WorkerProcess] = []

    def start(name: str | None = None, **env: str) -> WorkerProcess:
        worker = WorkerProcess(name or f"w{uuid.uuid4().hex[:6]}", worker_logs, env).start()
        started.append(worker)
        return worker

    yield start
    # Side by side: the workers' warm shutdowns overlap instead of adding up.
    stop_processes([worker.process for worker in started])
    for worker in started:
        worker.stop()  # closes its log


@pytest.fixture
def isolated(services: Services) -> Iterator[Isolated]:
    """A Redis database and queue of this test's own (flushed before and after)."""
    url, claimed = harness.another_database()
    Redis.from_url(url).flushdb()
    chosen = Isolated(url)
    try:
        yield chosen
    finally:
        chosen.runtime.close()
        Redis.from_url(url).flushdb()
        if claimed:
            harness.release_database(url)


@pytest.fixture
def api() -> Iterator[Sandbox]:
    """A sandbox of this test's own: its record holds only this test's posts."""
    with Sandbox(tokens=[TEST_TOKEN]) as own:
        yield own


@pytest.fixture(scope="module")
def app_settings() -> Any:
    """The settings ``server`` builds the HTTP service from (a module may override this)."""
    return harness.app_settings()


@pytest.fixture(scope="module")
def server(app_settings: Any, runtime: Any) -> Iterator[ServerThread]:
    """The HTTP service (``app_settings``, over the test runtime) on loopback, per module."""
    from worker.front.api import create_app

    with ServerThread(create_app(app_settings, runtime)) as running:
        yield running


@pytest.fixture
def http(server: ServerThread) -> Iterator[Any]:
    """An HTTP client of ``server``."""
    import httpx

    with httpx.Client(base_url=server.url, timeout=30) as client:
        yield client


# Kept for modules that import these from here; new code imports them from tests.harness.
__all__ = ["ROOT", "TEST_TOKEN", "WorkerProcess", "free_port", "wait_for"]


@pytest.fixture
def sentry() -> Iterator[harness.SentryRecorder]:
    """A loopback stand-in for Sentry, keeping every event the SDK sends."""
    recorder = harness.SentryRecorder()
    yield recorder
    recorder.stop()
