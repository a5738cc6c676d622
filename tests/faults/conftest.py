"""The faults tier: SIGKILL, failover, partitions, shutdown and end-to-end runs; all slow."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import harness

HERE = Path(__file__).resolve().parent


def pytest_configure(config: pytest.Config) -> None:
    # Before this folder's modules import the app (see tests/integration/conftest.py).
    harness.start_services()


@pytest.hookimpl(tryfirst=True)  # before -m "not slow" deselects
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # The whole tier is slow: `make test-fast` (-m "not slow") leaves it out.
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(pytest.mark.slow)
