"""The failure limits' decision (worker/front/guard.py), without Redis: which blocks one more
failure leaves, and for how long."""

from __future__ import annotations

from worker.front.guard import FailureLimits, blocks_after_failure

LIMITS = FailureLimits(window_seconds=300, per_address=3, total=10)


def test_failures_up_to_the_limits_block_nobody():
    assert blocks_after_failure(LIMITS, 3, 200, 10, 100) == {}


def test_one_past_the_address_limit_blocks_that_address_for_the_rest_of_its_window():
    assert blocks_after_failure(LIMITS, 4, 200, 5, 100) == {"address": 200}


def test_one_past_the_total_blocks_everyone_for_the_rest_of_the_total_window():
    assert blocks_after_failure(LIMITS, 1, 300, 11, 42) == {"": 42}


def test_both_limits_passed_block_both():
    assert blocks_after_failure(LIMITS, 5, 10, 12, 20) == {"address": 10, "": 20}


def test_a_window_without_an_expiry_counts_as_a_whole_window():
    assert blocks_after_failure(LIMITS, 4, -1, 1, -1) == {"address": 300}
