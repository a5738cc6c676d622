"""The dead-letter store: list, show, replay and delete messages that failed for good.

Dead letters are written by ``records.MessageStore.dead_letter`` (atomically with the message's
state, before the broker message is acknowledged); this module reads them (as
``codec.DeadLetter``, selected by ``query.DeadLetterFilter``) and manages them. Replay sends a
letter back through the whole pipeline (validation included) with a new generation and a replay
count; delete removes it and the message's status record.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import cast

from redis import Redis

from worker.queue.envelopes import Envelope
from worker.shapes.contract import DEFAULT_PAGE_LIMIT
from worker.store import keys
from worker.store.codec import DeadLetter
from worker.store.query import DeadLetterFilter, PageCursor
from worker.store.records import MessageStore

__all__ = [
    "DeadLetter",
    "DeadLetterFilter",
    "DeadLetterStore",
    "Page",
    "PageCursor",
    "redrive_schedule",
]

SCAN_CHUNK = 500
REPLAY_CHUNK = 200  # dead letters replayed and published together in a bulk replay


@dataclass(frozen=True, slots=True)
class Page:
    """One page of dead letters, newest first, and the cursor of the next page (None at the end)."""

    items: list[DeadLetter]
    next_cursor: PageCursor | None


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

    def _walk(self, after: PageCursor | None) -> Iterator[tuple[int, str]]:
        # (time, id) of every letter in the index strictly after ``after``, newest first, in
        # the index's own order (score, then id, both descending). Keyset, not offsets: each
        # chunk starts after the last pair read, so letters added or removed meanwhile move
        # no position. The ties of one millisecond are read whole (few share one).
        tie_ms, below = (after.dead_ms, after.letter_id) if after is not None else (0, None)
        while True:
            upper = "+inf"
            if below is not None:
                ties = cast(list[str], self.redis.zrangebyscore(keys.DEAD_INDEX, tie_ms, tie_ms))
                # Redis orders equal scores by the members' bytes; ids are ASCII.
                yield from ((tie_ms, member) for member in reversed(ties) if member < below)
                upper = f"({tie_ms}"
            rows = cast(
                list[tuple[str, float]],
                self.redis.zrevrangebyscore(
                    keys.DEAD_INDEX, upper, "-inf", start=0, num=SCAN_CHUNK, withscores=True
                ),
            )
            for member, score in rows:
                yield int(score), member
            if len(rows) < SCAN_CHUNK:
                return
            tie_ms, below = int(rows[-1][1]), rows[-1][0]

    def _scan(
        self, selection: DeadLetterFilter, after: PageCursor | None
    ) -> Iterator[tuple[PageCursor, DeadLetter]]:
        # The letters ``selection`` matches after ``after``, newest first, each with its place.
        walk = self._walk(after)
        while chunk := list(itertools.islice(walk, SCAN_CHUNK)):
            pipe = self.redis.pipeline(transaction=False)
            for _, letter_id in chunk:
                pipe.hgetall(keys.dead_letter(letter_id))
            for (dead_ms, letter_id), data in zip(chunk, pipe.execute(), strict=True):
                if not data:  # deleted since the index was read
                    continue
                letter = DeadLetter.from_hash(data)
                if selection.matches(letter):
                    yield PageCursor(dead_ms, letter_id), letter

    def page(
        self,
        selection: DeadLetterFilter | None = None,
        *,
        after: PageCursor | None = None,
        limit: int = DEFAULT_PAGE_LIMIT,
    ) -> Page:
        """A page of dead letters, newest first, after the cursor ``after`` (None: the first
        page); pass ``next_cursor`` back as ``after`` for the next page."""
        items: list[DeadLetter] = []
        last: PageCursor | None = None
        for place, letter in self._scan(selection or DeadLetterFilter(), after):
            if len(items) == limit:
                return Page(items, last)
            items.append(letter)
            last = place
        return Page(items, None)

    def select(self, selection: DeadLetterFilter) -> list[str]:
        """The ids of every dead letter that ``selection`` matches."""
        return [letter.id for _, letter in self._scan(selection, None)]

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
