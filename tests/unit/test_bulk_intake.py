"""The producer's bulk intake (``submit_many``, behind ``POST /messages/batch``) without Redis:
each request validated on its own, the valid ones recorded in one ``create_each`` call (one
round trip) and published once, nothing of an invalid one recorded."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import pytest

from worker.intake.producer import Enqueued, submit_many
from worker.queue.envelopes import Envelope
from worker.rules.allowlist import AllowList
from worker.rules.validation import InvalidRequest
from worker.runtime import Runtime
from worker.settings import Settings, load_settings


@dataclass
class _Store:
    laned: bool = False
    calls: list[list[str]] = field(default_factory=list)
    known: set[str] = field(default_factory=set)

    def create_each(
        self, items: list[tuple[str, Mapping[str, Any]]], extras: list[Any] | None = None
    ) -> list[tuple[bool, str]]:
        self.calls.append([ident for ident, _ in items])
        results = []
        for ident, _ in items:
            results.append((ident not in self.known, "queued"))
            self.known.add(ident)
        return results


@dataclass
class _Runtime:
    allowlist: AllowList
    settings: Settings = field(default_factory=load_settings)
    store: _Store = field(default_factory=_Store)
    published: list[list[Envelope]] = field(default_factory=list)

    def publish(self, envelopes: list[Envelope]) -> None:
        self.published.append(envelopes)


def _runtime() -> _Runtime:
    return _Runtime(AllowList.from_entries(["welcome"], ["app.example.com"]))


def _body(session: str, template: str = "welcome") -> dict[str, Any]:
    return {"sessionId": session, "templateId": template, "context": {}}


def test_each_request_is_answered_in_order_and_only_the_valid_ones_are_recorded_at_once() -> None:
    rt = _runtime()
    requests: list[tuple[Any, Any]] = [
        ("u1", _body("s1")),
        ("u2", _body("s2", template="evil")),
        ("", _body("s3")),
        ("u4", _body("s4")),
        ("u1", _body("s1")),  # the first one again: one message
    ]
    answers = submit_many(requests, runtime=cast(Runtime, rt), partner="acme")
    assert [type(answer) for answer in answers] == [
        Enqueued,
        InvalidRequest,
        InvalidRequest,
        Enqueued,
        Enqueued,
    ]
    first, refused, no_user, fourth, again = answers
    assert isinstance(refused, InvalidRequest) and isinstance(no_user, InvalidRequest)
    assert [p.code for p in refused.problems] == ["TEMPLATE_NOT_ALLOWED"]
    assert [p.code for p in no_user.problems] == ["INVALID_USER_ID"]
    assert isinstance(first, Enqueued) and isinstance(again, Enqueued)
    assert isinstance(fourth, Enqueued)
    assert (first.duplicate, fourth.duplicate, again.duplicate) == (False, False, True)
    assert again.id == first.id
    # One create_each for the whole request, of the valid ones only; each new one published.
    assert rt.store.calls == [[first.id, fourth.id, first.id]]
    assert [[e.id for e in batch] for batch in rt.published] == [[first.id, fourth.id]]


def test_nothing_is_recorded_when_every_request_is_invalid() -> None:
    rt = _runtime()
    answers = submit_many([("u1", {"sessionId": "s"}), ("u2", [])], runtime=cast(Runtime, rt))
    assert all(isinstance(answer, InvalidRequest) for answer in answers)
    assert rt.store.calls == [] and rt.published == []


@pytest.mark.parametrize("company", ["not-a-company", "ACME"])
def test_a_company_that_names_none_refuses_each_request(company: str) -> None:
    rt = _runtime()
    answers = submit_many([("u1", _body("s1"))], runtime=cast(Runtime, rt), company=company)
    [refused] = answers
    assert isinstance(refused, InvalidRequest)
    assert [p.code for p in refused.problems] == ["INVALID_COMPANY"]
    assert rt.store.calls == []
