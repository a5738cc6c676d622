"""Guessing keys is limited across processes (issue 23, item 8): wrong keys counted in Redis per
client address and over all, for API bearer keys and console logins alike.

Two real ``notify api`` processes share one Redis. Client addresses are told apart the way a
deployment behind a proxy tells them: ``X-Forwarded-For`` from a trusted proxy (this machine,
``NOTIFY_SERVICE_TRUSTED_PROXIES``' default).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.harness import NotifyApi
from worker.front.guard import FailureLimiter, FailureLimits
from worker.store import keys

PARTNER_KEY = "guess-partner-" + uuid.uuid4().hex
OPERATOR_KEY = "guess-operator-" + uuid.uuid4().hex
PER_ADDRESS = 3
TOTAL = 8
CSRF = re.compile(r'name="csrf" value="([^"]+)"')


def _clear_counters(runtime: Any) -> None:
    # Other tests' wrong keys, from 127.0.0.1, share this Redis: start from no failures.
    stale = list(runtime.redis.scan_iter(keys.AUTH_FAILURES + "*"))
    if stale:
        runtime.redis.delete(*stale)


@pytest.fixture
def pair(tmp_path: Path, runtime: Any) -> Iterator[tuple[NotifyApi, NotifyApi]]:
    """Two processes with small limits, started fresh (each remembers the blocks it saw)."""
    _clear_counters(runtime)
    env = {
        "NOTIFY_GATEWAY_KEYS": f"acme:{PARTNER_KEY}",
        "NOTIFY_OPERATOR_KEYS": OPERATOR_KEY,
        "NOTIFY_AUTH_FAILURES_PER_ADDRESS": str(PER_ADDRESS),
        "NOTIFY_AUTH_FAILURES_TOTAL": str(TOTAL),
        "NOTIFY_AUTH_FAILURE_WINDOW_SECONDS": "300",
    }
    first = NotifyApi(tmp_path / "a.log", env)
    second = NotifyApi(tmp_path / "b.log", env)
    yield first, second
    first.stop()
    second.stop()
    _clear_counters(runtime)


def _get(api: NotifyApi, address: str, key: str) -> httpx.Response:
    return httpx.get(
        f"{api.url}/notifications",
        params={"status": "failed"},
        headers={"Authorization": f"Bearer {key}", "X-Forwarded-For": address},
        timeout=30,
    )


def _login(api: NotifyApi, address: str, key: str) -> httpx.Response:
    with httpx.Client(base_url=api.url, timeout=30, headers={"X-Forwarded-For": address}) as c:
        found = CSRF.search(c.get("/console/login").text)
        assert found
        return c.post("/console/login", data={"csrf": found.group(1), "key": key})


def test_wrong_keys_from_one_address_over_two_processes_lock_out_that_address_only(pair):
    first, second = pair
    attacker, partner = "10.0.0.1", "10.0.0.2"
    wrong = "wrong-" + uuid.uuid4().hex
    # Three failures, alternating processes: at the limit, not past it.
    assert [_get(api, attacker, wrong).status_code for api in (first, second, first)] == [401] * 3
    # The fourth, on the other process, is past the per-address limit counted in Redis.
    blocked = _get(second, attacker, wrong)
    assert blocked.status_code == 429
    assert 0 < int(blocked.headers["Retry-After"]) <= 300
    # The first process learns of the block at its own next failure...
    assert _get(first, attacker, wrong).status_code == 429
    # ...and from then on no key of the attacker's address is even compared: a right guess
    # tells nothing.
    for api in (first, second):
        assert _get(api, attacker, OPERATOR_KEY).status_code == 429
        assert _login(api, attacker, OPERATOR_KEY).status_code == 429
    # Another address is served as before, on both.
    for api in (first, second):
        assert _get(api, partner, OPERATOR_KEY).status_code == 200


def test_wrong_keys_from_many_addresses_past_the_total_lock_out_everyone(pair):
    first, second = pair
    wrong = "wrong-" + uuid.uuid4().hex
    answers = []
    for number in range(TOTAL + 1):  # one failure per address: no address over its own limit
        api = (first, second)[number % 2]
        answers.append(_get(api, f"10.1.0.{number}", wrong).status_code)
    assert answers[:TOTAL] == [401] * TOTAL
    assert answers[TOTAL] == 429
    newcomer = "10.2.0.1"  # never failed
    api = (first, second)[TOTAL % 2]
    assert _get(api, newcomer, PARTNER_KEY).status_code == 429


def test_twenty_parallel_wrong_logins_are_cut_off_at_the_limit(pair):
    first, second = pair
    attacker = "10.3.0.1"
    with ThreadPoolExecutor(20) as pool:
        statuses = list(
            pool.map(
                lambda n: (
                    _login(
                        (first, second)[n % 2], attacker, f"guess-{n}-{uuid.uuid4().hex}"
                    ).status_code
                ),
                range(20),
            )
        )
    assert statuses.count(401) == PER_ADDRESS, statuses
    assert statuses.count(429) == 20 - PER_ADDRESS, statuses


class Clock:
    """A monotonic clock the test moves."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_process_remembers_a_block_until_its_window_ends_without_asking_redis(runtime: Any):
    _clear_counters(runtime)
    clock = Clock()
    limiter = FailureLimiter(runtime.redis, FailureLimits(60, per_address=2, total=1000), clock)
    address = "10.4.0.1"
    assert limiter.record_failure(address) is None
    assert limiter.record_failure(address) is None
    blocked_for = limiter.record_failure(address)
    assert blocked_for is not None and 0 < blocked_for <= 60
    assert limiter.retry_after(address) == blocked_for
    assert limiter.retry_after("10.4.0.2") is None  # another address is not blocked
    clock.now += blocked_for - 1
    assert limiter.retry_after(address) == pytest.approx(1)
    clock.now += 1
    assert limiter.retry_after(address) is None  # the window is over
    _clear_counters(runtime)
