"""The unit tier: no Redis, no processes, no sandbox, no sleeps; clocks are injected.

Its settings point Redis and Concur where nothing answers (tests/harness.py), so a test here
that reaches for either fails at once; a test asking for a fixture of the services is refused
at collection, naming it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent

SERVICE_FIXTURES = frozenset(
    {
        "services",
        "sandbox",
        "runtime",
        "celery_worker_process",
        "start_worker",
        "isolated",
        "api",
        "server",
        "http",
    }
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if HERE not in item.path.parents:
            continue
        used = SERVICE_FIXTURES.intersection(getattr(item, "fixturenames", ()))
        if used:
            raise pytest.UsageError(
                f"{item.nodeid} is in tests/unit but uses {sorted(used)}: "
                "move it to tests/integration"
            )
