"""The global rate limit's policy, decided without Redis: the settings, the waiting steps, what
slows everyone down, and a limit that is off making no round trip at all."""

from __future__ import annotations

import pytest
from redis import Redis

from tests.harness import free_port
from worker.limits.ratelimit import (
    POLL_CAP_SECONDS,
    RateLimiter,
    RateLimitPolicy,
    Reservation,
    next_step,
)
from worker.rules import outcomes
from worker.rules.outcomes import slows_down
from worker.settings import load_settings


def test_policy_defaults_to_off_and_burst_to_one() -> None:
    off = RateLimitPolicy.from_settings(load_settings())
    assert not off.enabled
    assert off.interval_us == 0
    on = RateLimitPolicy.from_settings(load_settings(rate_limit_per_second=12.5))
    assert on.enabled and on.burst == 1 and on.interval_us == 80_000
    bursty = RateLimitPolicy.from_settings(
        load_settings(rate_limit_per_second=20, rate_limit_burst=8, rate_limit_penalty_seconds=7)
    )
    assert (bursty.burst, bursty.penalty_seconds) == (8, 7)


def test_bad_rate_limit_settings_name_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    from worker.settings import SettingsError

    monkeypatch.setenv("NOTIFY_RATE_LIMIT_PER_SECOND", "-3")
    with pytest.raises(SettingsError, match="NOTIFY_RATE_LIMIT_PER_SECOND"):
        load_settings()
    monkeypatch.setenv("NOTIFY_RATE_LIMIT_PER_SECOND", "5")
    monkeypatch.setenv("NOTIFY_RATE_LIMIT_BURST", "0")
    with pytest.raises(SettingsError, match="NOTIFY_RATE_LIMIT_BURST"):
        load_settings()


def test_waiting_policy_sleeps_for_a_reserved_slot_polls_briefly_then_defers() -> None:
    go = next_step(Reservation(True, 0.3), remaining_seconds=4.0)
    assert (go.action, go.seconds) == ("go", 0.3)
    poll = next_step(Reservation(False, 30.0), 4.0)
    assert poll.action == "poll" and poll.seconds == POLL_CAP_SECONDS  # never a long sleep
    assert next_step(Reservation(False, 30.0), 0.2).seconds == pytest.approx(0.2)
    defer = next_step(Reservation(False, 30.0), 0.0)
    assert (defer.action, defer.seconds) == ("defer", 30.0)


def test_only_a_429_slows_everyone_down() -> None:
    assert slows_down(outcomes.Retry(1.0, "http_429", 429))
    assert slows_down(outcomes.GiveUp(outcomes.RETRIES_EXHAUSTED, "x", 429))
    assert not slows_down(outcomes.Retry(1.0, "http_503", 503))
    assert not slows_down(outcomes.Retry(1.0, "timeout"))
    assert not slows_down(outcomes.Delivered(200))


def test_limit_off_never_touches_redis() -> None:
    # A client for a port where nothing listens: any round trip would raise.
    nowhere = Redis(host="127.0.0.1", port=free_port(), socket_connect_timeout=0.2)
    limiter = RateLimiter(nowhere, RateLimitPolicy(per_second=0))
    for _ in range(1000):
        assert limiter.acquire(limiter.deadline()).granted
    limiter.penalize()
