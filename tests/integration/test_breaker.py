"""The circuit breaker: its states in real Redis, and an API outage end to end (what counts as the
API failing: tests/unit/test_breaker_decisions.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from typing import Any

import pytest

from tests.harness import ROOT, Isolated, wait_for
from tests.reconcile import (
    assert_all_accounted,
    ids_of,
    reconcile,
    requests_for,
    settle,
    workers_env,
)
from worker.front.stats import collect, render_prometheus
from worker.limits import breaker as breakers
from worker.limits.breaker import Breaker, BreakerPolicy, counts_as_failure
from worker.rules.outcomes import ApiResponse

POLICY = BreakerPolicy(
    window_seconds=10,
    min_calls=5,
    failure_ratio=0.5,
    open_seconds=0.5,
    max_open_seconds=2.0,
    probe_lease_seconds=1.0,
)


def test_it_opens_only_with_enough_calls_and_a_high_enough_failure_share(
    isolated: Isolated,
) -> None:
    breaker = Breaker(isolated.runtime.redis, POLICY)
    assert breaker.record(4, 4) == ""  # every call failed, but fewer than min_calls
    assert breaker.admit().verdict == breakers.CLOSED
    assert breaker.record(6, 0) == ""  # 4 of 10 failed: under the ratio
    assert breaker.record(2, 2) == "opened"  # 6 of 12: at the ratio
    admission = breaker.admit()
    assert admission.verdict == breakers.OPEN
    assert admission.until_ms > time.time() * 1000
    status = breaker.status()
    assert (status.state, status.calls, status.failures) == ("open", 12, 6)


def test_4xx_answers_keep_it_closed(isolated: Isolated) -> None:
    breaker = Breaker(isolated.runtime.redis, POLICY)
    answers = [ApiResponse(400)] * 30 + [ApiResponse(503)] * 5
    failures = sum(counts_as_failure(a) for a in answers)
    assert breaker.record(len(answers), failures) == ""
    assert breaker.admit().verdict == breakers.CLOSED


def test_half_open_lets_exactly_one_probe_through(isolated: Isolated) -> None:
    breaker = Breaker(isolated.runtime.redis, POLICY)
    assert breaker.record(5, 5) == "opened"
    time.sleep(POLICY.open_seconds + 0.1)
    verdicts: list[str] = []
    lock = threading.Lock()

    def ask() -> None:
        verdict = breaker.admit().verdict
        with lock:
            verdicts.append(verdict)

    threads = [threading.Thread(target=ask) for _ in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert Counter(verdicts) == {breakers.PROBE: 1, breakers.WAIT: 11}
    assert breaker.status().state == breakers.HALF_OPEN


def test_a_failed_probe_opens_it_again_for_twice_as_long_up_to_the_cap(
    isolated: Isolated,
) -> None:
    breaker = Breaker(isolated.runtime.redis, POLICY)
    breaker.record(5, 5)
    open_for = []
    for _ in range(4):
        wait_for(lambda: breaker.admit().verdict == breakers.PROBE, timeout=5, interval=0.05)
        assert breaker.record(1, 1, probe=False) == "reopened"
        open_for.append(breaker.status().open_seconds)
    assert open_for == [1.0, 2.0, 2.0, 2.0]


def test_a_successful_probe_closes_it_with_a_fresh_window(isolated: Isolated) -> None:
    breaker = Breaker(isolated.runtime.redis, POLICY)
    breaker.record(5, 5)
    wait_for(lambda: breaker.admit().verdict == breakers.PROBE, timeout=5, interval=0.05)
    assert breaker.record(1, 0, probe=True) == "closed"
    status = breaker.status()
    assert (status.state, status.calls, status.failures) == ("closed", 0, 0)
    assert breaker.admit().verdict == breakers.CLOSED


def _notify(isolated: Isolated, *args: str, **env: str) -> str:
    done = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "notify"), *args]
        if (ROOT / ".venv" / "bin" / "notify").exists()
        else [sys.executable, "-m", "worker.front.cli", *args],
        env={**os.environ, **isolated.env, **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return done.stdout


def test_an_operator_opens_and_closes_it_and_metrics_show_it(isolated: Isolated) -> None:
    # `notify breaker open|close` with no geolocation named: every one (here only the default).
    breaker = Breaker(isolated.runtime.redis, POLICY)  # on, whatever the tests' environment says
    env = {"NOTIFY_BREAKER_ENABLED": "true"}
    assert _notify(isolated, "breaker", "open", **env).startswith("default: forced_open")
    assert breaker.admit().verdict == breakers.OPEN
    assert 'notify_breaker_state{geolocation="default"} 2' in render_prometheus(
        collect(isolated.runtime)
    )
    assert collect(isolated.runtime).totals["breaker_opened"] == 1
    assert _notify(isolated, "breaker", "status", **env).startswith("default: forced_open")
    assert _notify(isolated, "breaker", "close", **env).startswith("default: closed")
    assert breaker.admit().verdict == breakers.CLOSED
    assert 'notify_breaker_state{geolocation="default"} 0' in render_prometheus(
        collect(isolated.runtime)
    )


def test_an_operator_stops_one_geolocation_by_name_and_the_others_keep_posting(
    isolated: Isolated,
) -> None:
    env = {"NOTIFY_BREAKER_ENABLED": "true"}
    emea = "emea.api.concursolutions.com"
    opened = _notify(isolated, "breaker", "open", emea, **env)
    assert opened.startswith(f"{emea}: forced_open")
    circuits = isolated.runtime.breakers
    assert Breaker(isolated.runtime.redis, POLICY, emea).admit().verdict == breakers.OPEN
    assert circuits.default.admit().verdict == breakers.CLOSED
    lines = _notify(isolated, "breaker", "status", **env).splitlines()
    assert [line.split(":")[0] for line in lines] == ["default", emea]
    assert lines[1].startswith(f"{emea}: forced_open")
    as_json = json.loads(_notify(isolated, "breaker", "status", "--json", **env))
    assert {name: status["state"] for name, status in as_json.items()} == {
        "default": "closed",
        emea: "forced_open",
    }
    assert _notify(isolated, "breaker", "close", emea, **env).startswith(f"{emea}: closed")
    assert Breaker(isolated.runtime.redis, POLICY, emea).admit().verdict == breakers.CLOSED
    refused = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "notify"), "breaker", "open", "https://not a host/"],
        env={**os.environ, **isolated.env, **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert refused.returncode == 2 and "is not a geolocation" in refused.stderr
    assert circuits.default.admit().verdict == breakers.CLOSED


@pytest.mark.slow
def test_an_api_outage_pauses_the_fleet_and_no_message_spends_its_attempts(
    start_worker, isolated: Isolated, api: Any
) -> None:
    # Issue 15's outage, scaled down: the API answers 503 to everything for 20 s (five minutes
    # in production terms) while 500 messages are queued; with 8 attempts a message, a fleet
    # without the breaker would post up to 4,000 times and dead-letter every message.
    outage_seconds = 20
    api.script([], then={"status": 503})
    env = workers_env(
        isolated,
        api,
        NOTIFY_BREAKER_ENABLED="true",
        NOTIFY_BREAKER_WINDOW_SECONDS="10",
        NOTIFY_BREAKER_MIN_CALLS="20",
        NOTIFY_BREAKER_OPEN_SECONDS="1",
        NOTIFY_BREAKER_MAX_OPEN_SECONDS="4",
    )
    start_worker("outage-a", **env)
    start_worker("outage-b", **env)
    sent = requests_for(500)
    ids = ids_of(sent)
    began = time.monotonic()
    isolated.enqueue_many(sent)
    wait_for(
        lambda: isolated.runtime.breaker.status().state != breakers.CLOSED,
        timeout=30,
        what="the breaker to open",
    )
    time.sleep(max(0.0, outage_seconds - (time.monotonic() - began)))
    posts_during_outage = api.stats()["total"]
    dead_during_outage = isolated.runtime.deadletters.count()
    api.clear_scripts()
    recovered = time.monotonic()
    settle(isolated.runtime, ids, timeout=120, what="every message after the outage")
    drained_seconds = time.monotonic() - recovered

    result = reconcile(isolated.runtime, api, sent)
    assert_all_accounted(result)
    assert len(result.delivered) == len(sent)
    assert dead_during_outage == 0
    assert isolated.runtime.deadletters.count() == 0
    # A small fraction of messages x attempts: the posts in flight when it opened, then probes.
    assert posts_during_outage < 0.25 * len(sent) * 8, posts_during_outage
    opened = collect(isolated.runtime).totals["breaker_opened"]
    print(
        f"outage {outage_seconds}s: {len(sent)} messages, {posts_during_outage} posts during "
        f"the outage, breaker opened {opened}x, 0 dead letters, drained {drained_seconds:.1f}s "
        "after the API returned"
    )
