"""A Redis database and queue of a test's own, for tests that must know which worker did the work.

The session worker (``celery_worker_process``) stays up once a module has used it, and it shares
the run's Redis database: it would take messages (and, through its mover, retries) from a test
that watches one particular worker (Sentry events, Flower, a SIGTERM). Such a test runs its
workers, and its producer, against a database nobody else uses.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from redis import Redis

from tests import conftest
from worker.runtime import Runtime
from worker.settings import load_settings

_PRODUCE = """
import json, sys
import tasks
requests = [tuple(r) for r in json.load(sys.stdin)]
print(json.dumps(tasks.enqueue_many(requests)))
"""


class Isolated:
    """Environment overrides for workers and producers, and a runtime to read the outcome."""

    def __init__(self, redis_url: str) -> None:
        self.env = {
            "NOTIFY_REDIS_URL": redis_url,
            "NOTIFY_QUEUE_NAME": f"notify-isolated-{uuid.uuid4().hex[:8]}",
        }
        settings = load_settings(redis_url=redis_url, queue_name=self.env["NOTIFY_QUEUE_NAME"])
        self.runtime = Runtime.from_settings(settings)

    def enqueue_many(self, requests: list[tuple[str, str, str, str | None]]) -> list[str]:
        """Queue messages through ``tasks.enqueue_many`` in a producer process of this database."""
        done = subprocess.run(
            [sys.executable, "-c", _PRODUCE],
            input=json.dumps(requests),
            env={**os.environ, **self.env},
            cwd=conftest.ROOT,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        ids: list[str] = json.loads(done.stdout.strip().splitlines()[-1])
        return ids

    def state(self, message_id: str) -> str | None:
        record: dict[str, Any] | None = self.runtime.store.status(message_id)
        return record["state"] if record else None


def _another_database() -> tuple[str, bool]:
    current = os.environ["NOTIFY_REDIS_URL"]
    if current.startswith(conftest.LOCAL_REDIS + "/") and not os.environ.get(
        "NOTIFY_TEST_REDIS_URL"
    ):
        claimed = conftest._claim_database()
        if claimed is None:
            pytest.skip("no free Redis database number for an isolated test")
        return claimed, True
    # A private (embedded) or explicitly given server: take the database eight numbers on.
    base, _, number = current.rpartition("/")
    return f"{base}/{(int(number or 0) + 8) % 16}", False


@pytest.fixture
def isolated() -> Iterator[Isolated]:
    """A Redis database and queue of this test's own (flushed before and after)."""
    url, claimed = _another_database()
    Redis.from_url(url).flushdb()
    chosen = Isolated(url)
    try:
        yield chosen
    finally:
        chosen.runtime.close()
        Redis.from_url(url).flushdb()
        if claimed:
            conftest._release_database(url)
