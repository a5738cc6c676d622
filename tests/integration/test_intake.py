"""The gateway's intake: concurrent requests are recorded in groups, each gets its own answer,
a failure fails exactly its group, and a lone request is not held back."""

from __future__ import annotations

import asyncio
import threading
import uuid
from collections.abc import Sequence
from typing import Any

import pytest

import tasks
from worker.intake.intake import Intake, Recorded
from worker.shapes.models import Message


def _message(session: str, user: str = "intake-user") -> Message:
    # An allowed template and host: a session worker may deliver what the first test records.
    return Message.create(user, session, "welcome", "https://app.example.com/x")


def test_concurrent_requests_share_round_trips_and_each_gets_its_own_answer(
    runtime: Any,
) -> None:
    groups: list[int] = []

    def record(messages: Sequence[Message]) -> list[Recorded]:
        groups.append(len(messages))
        return tasks.record(messages, runtime=runtime)

    intake = Intake(record)
    run = uuid.uuid4().hex[:8]
    fresh = [_message(f"{run}-{n}") for n in range(200)]

    async def main() -> list[Recorded]:
        # The first of each pair is new; the same request again (same id) is a duplicate,
        # even when both land in one group.
        return await asyncio.gather(*(intake.record(m) for m in fresh + fresh))

    answers = asyncio.run(main())
    assert answers[:200] == [(True, "queued")] * 200
    assert all(created is False for created, _ in answers[200:])
    assert sum(groups) == 400
    assert len(groups) < 400  # they did travel together
    assert max(groups) <= 64
    for message in fresh:
        assert runtime.store.status(message.id)["state"] in {"queued", "inflight", "delivered"}


def test_a_lone_request_is_recorded_at_once() -> None:
    groups: list[list[str]] = []
    release = threading.Event()

    def record(messages: Sequence[Message]) -> list[Recorded]:
        groups.append([m.session_id for m in messages])
        release.wait(10)
        return [(True, "queued")] * len(messages)

    intake = Intake(record)

    async def main() -> Recorded:
        lone = asyncio.ensure_future(intake.record(_message("lone")))
        # Recorded alone while nothing else arrives: no wait for company (waited for, not
        # timed; an intake holding it back for a fuller group never records it).
        while not groups:
            await asyncio.sleep(0.01)
        release.set()
        return await lone

    assert asyncio.run(main()) == (True, "queued")
    assert groups == [["lone"]]


def test_a_failure_fails_exactly_the_requests_of_its_group() -> None:
    release = threading.Event()
    calls: list[list[str]] = []

    def record(messages: Sequence[Message]) -> list[Recorded]:
        calls.append([m.session_id for m in messages])
        if len(calls) == 1:
            release.wait(5)  # hold the first group so the others gather behind it
            raise ConnectionError("Redis went away")
        return [(True, "queued")] * len(messages)

    intake = Intake(record)

    async def main() -> list[Recorded | BaseException]:
        first = asyncio.ensure_future(intake.record(_message("first")))
        while not calls:  # the first group is being recorded: the others gather behind it
            await asyncio.sleep(0.01)
        later = [asyncio.ensure_future(intake.record(_message(f"later-{n}"))) for n in range(5)]
        await asyncio.sleep(0.05)
        release.set()
        return await asyncio.gather(first, *later, return_exceptions=True)

    first, *later = asyncio.run(main())
    assert isinstance(first, ConnectionError)
    assert later == [(True, "queued")] * 5
    assert calls[0] == ["first"]


def test_a_request_cancelled_while_recorded_does_not_break_the_others() -> None:
    release = threading.Event()

    def record(messages: Sequence[Message]) -> list[Recorded]:
        release.wait(5)
        return [(True, "queued")] * len(messages)

    intake = Intake(record)

    async def main() -> Recorded:
        gone = asyncio.ensure_future(intake.record(_message("gone")))
        await asyncio.sleep(0.02)
        gone.cancel()
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await gone
        return await intake.record(_message("next"))

    assert asyncio.run(main()) == (True, "queued")


def test_a_wrong_sized_answer_fails_its_group_and_the_intake_keeps_working() -> None:
    calls: list[int] = []

    def record(messages: Sequence[Message]) -> list[Recorded]:
        calls.append(len(messages))
        short = 1 if len(calls) == 1 else 0  # the first group gets one answer too few
        return [(True, "queued")] * (len(messages) - short)

    intake = Intake(record)

    async def main() -> tuple[Recorded | BaseException, Recorded]:
        first_call = asyncio.wait_for(intake.record(_message("first")), 5)
        [first] = await asyncio.gather(first_call, return_exceptions=True)
        return first, await asyncio.wait_for(intake.record(_message("after")), 5)

    first, after = asyncio.run(main())
    assert isinstance(first, RuntimeError)
    assert after == (True, "queued")
    assert calls == [1, 1]
