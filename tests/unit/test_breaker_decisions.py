"""What counts as the API failing, for the circuit breaker: no answer, a 5xx or a 429 (its
states in Redis and an outage end to end: tests/integration/test_breaker.py)."""

from __future__ import annotations

from typing import Any

import pytest

from worker.limits.breaker import counts_as_failure
from worker.rules.outcomes import ApiResponse, TransportFailure


@pytest.mark.parametrize(
    ("result", "failed"),
    [
        (TransportFailure("timeout", "t"), True),
        (TransportFailure("connect", "c"), True),
        (ApiResponse(500), True),
        (ApiResponse(503), True),
        (ApiResponse(429), True),
        (ApiResponse(200), False),
        (ApiResponse(400), False),
        (ApiResponse(401), False),
        (ApiResponse(404), False),
        (ApiResponse(408), False),
    ],
)
def test_only_no_answer_a_5xx_or_a_429_count_as_the_api_failing(result: Any, failed: bool) -> None:
    assert counts_as_failure(result) is failed
