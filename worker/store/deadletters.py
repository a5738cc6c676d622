"""The dead-letter store: list, show, replay and delete messages that failed for good.

Dead letters are written by ``records.MessageStore.dead_letter`` (atomically with the message's
state, before the broker message is acknowledged); this module reads and manages them. Replay
sends a letter back through the whole pipeline (validation included) with a new generation and
a replay count; delete removes it and the message's status record.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any, cast

from redis import Redis

from worker.queue.envelopes import Envelope
from worker.shapes.contract import DEFAULT_PAGE_LIMIT
from worker.shapes.models import DEFAULT_PARTNER, partner_of
from worker.shapes.times import int_or_none
from worker.store import keys
from worker.store.records import MessageStore

SCAN_CHUNK = 500
REPLAY_CHUNK = 200  # dead letters replayed and published together in a bulk replay


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One message that failed for good, with everything an operator needs to decide."""

    id: str
    user_id: str
    request: dict[str, Any]
    reason: str
    detail: str
    status: int | None
    errors: list[dict[str, Any]]
    attempts: int
    first_attempt_ms: int | None
    last_attempt_ms: int | None
    dead_ms: int
    created_ms: int | None
    correlation_id: str | None
    task_id: str | None
    worker: str | None
    replays: int
    partner: str = DEFAULT_PARTNER

    @property
    def template_id(self) -> str | None:
        """The request's template id, when the request had one."""
        value = self.request.get("templateId")
        return value if isinstance(value, str) else None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (snake_case keys) for the CLI."""
        return asdict(self)

    @classmethod
    def from_hash(cls, data: dict[str, str]) -> DeadLetter:
        """Read the stored hash."""
        request = _json_object(data.get("req"))
        errors = _json_list(data.get("errors"))
        user_id = request.get("userId")
        return cls(
            id=data["id"],
            user_id=user_id if isinstance(user_id, str) else "",
            request=request,
            reason=data.get("reason", ""),
            detail=data.get("detail", ""),
            status=int_or_none(data.get("status")),
            errors=errors,
            attempts=int_or_none(data.get("attempts")) or 0,
            first_attempt_ms=int_or_none(data.get("first")),
            last_attempt_ms=int_or_none(data.get("last")),
            dead_ms=int_or_none(data.get("dead")) or 0,
            created_ms=int_or_none(data.get("created")),
            correlation_id=data.get("cid") or None,
            task_id=data.get("task") or None,
            worker=data.get("worker") or None,
            replays=int_or_none(data.get("replays")) or 0,
            partner=partner_of(request),
        )


@dataclass(frozen=True, slots=True)
class DeadLetterFilter:
    """Which dead letters an operator means; every field left None matches all."""

    reason: str | None = None
    template_id: str | None = None
    user_id: str | None = None
    since_ms: int | None = None
    partner: str | None = None
    http_status: int | None = None  # the API's answer on the last attempt
    until_ms: int | None = None  # dead-lettered at or before this time

    def matches(self, letter: DeadLetter) -> bool:
        """Whether ``letter`` is selected."""
        return (
            (self.partner is None or letter.partner == self.partner)
            and (self.reason is None or letter.reason == self.reason)
            and (self.template_id is None or letter.template_id == self.template_id)
            and (self.user_id is None or letter.user_id == self.user_id)
            and (self.since_ms is None or letter.dead_ms >= self.since_ms)
            and (self.until_ms is None or letter.dead_ms <= self.until_ms)
            and (self.http_status is None or letter.status == self.http_status)
        )


@dataclass(frozen=True, slots=True)
class Page:
    """One page of dead letters, newest first, and the cursor of the next page (None at the end)."""

    items: list[DeadLetter]
    next_cursor: int | None


class DeadLetterStore:
    """Reads and manages dead letters; ``publish`` sends a replayed message to the queue."""

    def __init__(
        self, redis: Redis, store: MessageStore, publish: Callable[[list[Envelope]], None]
    ) -> None:
        self.redis = redis
        self.store = store
        self.publish = publish

    def count(self) -> int:
        """How many dead letters there are."""
        return int(self.redis.zcard(keys.DEAD_INDEX))

    def get(self, letter_id: str) -> DeadLetter | None:
        """One dead letter, or None."""
        data = cast(dict[str, str], self.redis.hgetall(keys.dead_letter(letter_id)))
        return DeadLetter.from_hash(data) if data else None

    def _scan(self, selection: DeadLetterFilter, cursor: int) -> Iterator[tuple[int, DeadLetter]]:
        # Walks the index newest first in chunks, yielding (position after, letter) for matches.
        position = cursor
        while True:
            ids = cast(
                list[str],
                self.redis.zrevrange(keys.DEAD_INDEX, position, position + SCAN_CHUNK - 1),
            )
            if not ids:
                return
            pipe = self.redis.pipeline(transaction=False)
            for letter_id in ids:
                pipe.hgetall(keys.dead_letter(letter_id))
            for offset, data in enumerate(pipe.execute()):
                if not data:
                    continue
                letter = DeadLetter.from_hash(data)
                if selection.matches(letter):
                    yield position + offset + 1, letter
            if len(ids) < SCAN_CHUNK:
                return
            position += len(ids)

    def page(
        self,
        selection: DeadLetterFilter | None = None,
        *,
        cursor: int = 0,
        limit: int = DEFAULT_PAGE_LIMIT,
    ) -> Page:
        """A page of dead letters, newest first; pass ``next_cursor`` back for the next page."""
        items: list[DeadLetter] = []
        last_position = cursor
        for position, letter in self._scan(selection or DeadLetterFilter(), max(cursor, 0)):
            if len(items) == limit:
                return Page(items, last_position)
            items.append(letter)
            last_position = position
        return Page(items, None)

    def select(self, selection: DeadLetterFilter) -> list[str]:
        """The ids of every dead letter that ``selection`` matches."""
        return [letter.id for _, letter in self._scan(selection, 0)]

    def replay(self, letter_id: str) -> Envelope | None:
        """Send one dead letter back through the pipeline; None when it does not exist."""
        envelope = self.store.replay(letter_id)
        if envelope is not None:
            self.publish([envelope])
        return envelope

    def replay_many(
        self,
        selection: DeadLetterFilter,
        *,
        rate_per_second: float | None = None,
        on_progress: Callable[[int], None] | None = None,
    ) -> list[str]:
        """Replay every dead letter ``selection`` matches (see ``replay_ids``)."""
        return self.replay_ids(
            self.select(selection), rate_per_second=rate_per_second, on_progress=on_progress
        )

    def replay_ids(
        self,
        selected: list[str],
        *,
        rate_per_second: float | None = None,
        on_progress: Callable[[int], None] | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> list[str]:
        """Replay these dead letters, at most ``rate_per_second`` a second if given.

        Returns the ids replayed. Letters are replayed and published a chunk at a time (each
        chunk is marked queued before it is published: a crash in between leaves it on the
        schedule, which hands it out after the grace period); a paced redrive sleeps before
        each chunk until ``redrive_schedule`` says it is due. ``on_progress`` gets the number
        of letters each chunk handled.
        """
        replayed: list[str] = []
        started = clock()
        for due, chunk in redrive_schedule(selected, rate_per_second, REPLAY_CHUNK):
            pause = started + due - clock()
            if pause > 0:
                sleep(pause)
            envelopes = [e for e in map(self.store.replay, chunk) if e is not None]
            self.publish(envelopes)
            replayed += [envelope.id for envelope in envelopes]
            if on_progress is not None:
                on_progress(len(chunk))
        return replayed

    def delete(self, letter_id: str) -> bool:
        """Remove one dead letter and its message's record; False when it does not exist."""
        # The record stays "failed" only while the letter exists; with it gone the request may
        # be sent afresh, so its status and history go too. One script, so the operators'
        # gauges (dead letters by reason) change in the same step.
        return self.store.forget_dead_letter(letter_id)

    def delete_many(self, selection: DeadLetterFilter) -> list[str]:
        """Delete every dead letter ``selection`` matches; returns the ids deleted."""
        return self.delete_ids(self.select(selection))

    def delete_ids(
        self, selected: list[str], *, on_progress: Callable[[int], None] | None = None
    ) -> list[str]:
        """Delete these dead letters; returns the ids deleted (``on_progress`` gets 1 each)."""
        deleted = []
        for letter_id in selected:
            if self.delete(letter_id):
                deleted.append(letter_id)
            if on_progress is not None:
                on_progress(1)
        return deleted


def redrive_schedule(
    ids: list[str], rate_per_second: float | None, chunk: int
) -> Iterator[tuple[float, list[str]]]:
    """``(seconds from the start, ids)`` for each chunk of a redrive (pure).

    Unpaced, chunks of ``chunk`` ids all due at once. Paced at ``rate_per_second``, chunks are
    small enough that a second holds several (at most a fifth of a second's worth, at least one
    id) and each is due when the ids before it have used up their share of the rate: the
    redrive never runs ahead of the rate, as SQS's ``MaxNumberOfMessagesPerSecond``.
    """
    if rate_per_second is not None and rate_per_second <= 0:
        raise ValueError("rate_per_second must be positive")
    size = chunk if rate_per_second is None else max(1, min(chunk, int(rate_per_second / 5)))
    for start in range(0, len(ids), size):
        due = 0.0 if rate_per_second is None else start / rate_per_second
        yield due, ids[start : start + size]


def _json_object(raw: str | None) -> dict[str, Any]:
    try:
        value = json.loads(raw) if raw else {}
    except ValueError:
        return {"raw": raw}
    return value if isinstance(value, dict) else {"raw": value}


def _json_list(raw: str | None) -> list[dict[str, Any]]:
    try:
        value = json.loads(raw) if raw else []
    except ValueError:
        return []
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []
