"""The integration tier: real Redis, real worker processes, the sandbox on loopback."""

from __future__ import annotations

import pytest

from tests import harness


def pytest_configure(config: pytest.Config) -> None:
    # Before this folder's modules import the app: the test process and the workers it starts
    # read the same settings.
    harness.start_services()
