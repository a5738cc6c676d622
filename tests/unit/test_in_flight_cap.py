"""The cap on one worker process's posts in flight (``NOTIFY_MAX_IN_FLIGHT``), decided without I/O:
who may take slots, all at once or none, and the gauge's figure."""

from __future__ import annotations

import threading

import pytest

from worker.limits.inflight import InFlight, may_start
from worker.settings import Settings, load_settings


@pytest.mark.parametrize(
    ("in_flight", "wanted", "cap", "allowed"),
    [
        (0, 20, 400, True),
        (380, 20, 400, True),  # exactly up to the cap
        (381, 20, 400, False),  # one over: all or none, never a part
        (399, 1, 400, True),
        (400, 1, 400, False),
        (10_000, 20, 0, True),  # 0: no cap
        (0, 50, 40, True),  # a batch above the cap goes alone...
        (1, 50, 40, False),  # ...and only alone, so the bound is then the batch
        (400, 0, 400, True),  # nothing wanted, nothing to wait for
    ],
)
def test_a_batch_takes_its_slots_all_at_once_or_waits(
    in_flight: int, wanted: int, cap: int, allowed: bool
) -> None:
    assert may_start(in_flight, wanted, cap) is allowed


def test_slots_are_taken_and_given_back_and_the_peak_is_the_most_since_last_asked() -> None:
    cap = InFlight(40)
    assert cap.take(20) and cap.take(20)
    assert cap.taken == 40
    cap.give(15)
    assert cap.taken == 25
    assert cap.peak() == 40  # the most at once since the start
    assert cap.peak() == 25  # then it starts again from those taken now
    cap.give(100)  # more than taken never goes below zero
    assert cap.taken == 0


def test_a_full_cap_refuses_a_batch_once_the_worker_is_stopping() -> None:
    cap = InFlight(20)
    assert cap.take(20)
    # A warm shutdown: the waiting batch takes nothing and hands its messages back.
    assert cap.take(1, stopping=lambda: True) is False
    assert cap.taken == 20


def test_a_waiting_batch_goes_as_soon_as_slots_come_back() -> None:
    cap = InFlight(20)
    assert cap.take(15)
    took = threading.Event()
    looked = threading.Event()

    def stopping() -> bool:
        looked.set()  # asked only when there was no room: the batch is waiting
        return False

    waiter = threading.Thread(target=lambda: cap.take(10, stopping=stopping) and took.set())
    waiter.start()
    assert looked.wait(5)
    assert not took.is_set()  # 15 + 10 > 20: it waits
    cap.give(5)  # 10 + 10 = 20: it goes (woken, not polled)
    assert took.wait(5)
    waiter.join(5)
    assert cap.taken == 20


def test_the_default_cap_bounds_a_process_below_threads_times_batch() -> None:
    # The shipped defaults (the test environment sets fewer threads).
    default = {name: Settings.model_fields[name].default for name in Settings.model_fields}
    cap = default["max_in_flight"]
    assert default["batch_size"] <= cap < default["worker_concurrency"] * default["batch_size"]
    assert load_settings(max_in_flight=0).max_in_flight == 0


def test_the_gauges_sum_the_processes_and_name_the_most_of_one() -> None:
    from prometheus_client.parser import text_string_to_metric_families

    from worker.front.stats import build, render_prometheus

    stats = build(
        at_ms=0,
        queue="q",
        queue_lengths=[],
        reserved=0,
        live={},
        totals={},
        dead_index_size=0,
        minute_counts=[],
        penalty=None,
        posts_in_flight={"vm:1": "40", "vm:2": "12", "vm:3": "-1", "vm:4": "garbage"},
    )
    assert (stats.posts_in_flight, stats.posts_in_flight_most) == (52, 40)
    values = {
        sample.name: sample.value
        for family in text_string_to_metric_families(render_prometheus(stats))
        for sample in family.samples
    }
    assert values["notify_posts_in_flight"] == 52
    assert values["notify_posts_in_flight_process_max"] == 40
