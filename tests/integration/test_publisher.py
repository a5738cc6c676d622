"""The one publish path: batches what arrives together, holds no trickle back, loses nothing."""

from __future__ import annotations

import logging
import threading

import pytest

from tests.harness import wait_for
from worker.queue.envelopes import Envelope
from worker.queue.publisher import Publisher
from worker.queue.publisher import log as publisher_log


def _envelope(number: int) -> Envelope:
    return Envelope(f"m{number}", 1, {"userId": "u", "sessionId": f"s{number}"})


def test_a_burst_travels_in_batches_of_at_most_batch_size_and_all_arrive() -> None:
    batches: list[list[Envelope]] = []
    publisher = Publisher(batches.append, batch_size=20)
    for number in range(95):
        publisher.submit([_envelope(number)])
    assert publisher.flush()
    assert all(len(batch) <= 20 for batch in batches)
    assert [e.id for batch in batches for e in batch] == [f"m{n}" for n in range(95)]
    assert len(batches) < 95  # they did travel together


def test_a_steady_trickle_is_not_held_back_waiting_for_a_full_batch() -> None:
    published: list[str] = []
    publisher = Publisher(lambda batch: published.extend(e.id for e in batch), batch_size=20)
    for number in range(5):
        publisher.submit([_envelope(number)])
        # Out on its own, with no flush asked and 19 places left in its batch (waited for, not
        # timed: a busy machine may take its time, a publisher holding it back never sends it).
        wait_for(lambda n=number: f"m{n}" in published, timeout=10, what=f"m{number} to go out")
    assert published == [f"m{n}" for n in range(5)]


def test_a_failed_publish_is_logged_and_published_again_once_the_broker_answers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls: list[list[str]] = []

    def send(batch: list[Envelope]) -> None:
        calls.append([e.id for e in batch])
        if len(calls) == 1:
            raise ConnectionError("broker down")

    publisher = Publisher(send, batch_size=5)
    with caplog.at_level(logging.WARNING, logger=publisher_log.name):
        publisher.submit([_envelope(1)])
        assert publisher.flush()  # returns once m1 went out on the second try
        publisher.submit([_envelope(2)])
        assert publisher.flush()
    assert calls == [["m1"], ["m1"], ["m2"]]
    warnings = [r.getMessage() for r in caplog.records if r.name == publisher_log.name]
    assert any("failed (ConnectionError: broker down)" in m for m in warnings), warnings


def test_flush_says_false_while_the_broker_is_away_and_nothing_is_dropped() -> None:
    broker_up = threading.Event()
    sent: list[str] = []

    def send(batch: list[Envelope]) -> None:
        if not broker_up.is_set():
            raise ConnectionError("broker down")
        sent.extend(e.id for e in batch)

    publisher = Publisher(send, batch_size=3)
    publisher.submit([_envelope(n) for n in range(7)])
    assert not publisher.flush(0.3)
    assert sent == []
    broker_up.set()
    assert publisher.flush(10)
    assert sent == [f"m{n}" for n in range(7)]


def test_a_submission_larger_than_a_batch_is_split_into_batches() -> None:
    batches: list[list[Envelope]] = []
    publisher = Publisher(batches.append, batch_size=4)
    publisher.submit([_envelope(n) for n in range(10)])
    assert publisher.flush()
    assert [len(b) for b in batches] == [4, 4, 2]
