"""Which dead letters a person means: one filter and one time parser for the API, the console
and the CLI (pure).

Each front door reads its own parameters (``since``, ``--until``, a form field) and shows its own
errors, but all of them build their ``DeadLetterFilter`` through ``read_filter``, so a time
means the same everywhere (docs/http-api.md, docs/cli.md):

* ``since``: from the first millisecond of what it names (``2026-11-25``: midnight UTC);
* ``until``: through the last millisecond of what it names: a date alone is the whole day
  (``2026-11-25`` includes all of 25 November), a date-time the instant given, to the precision
  written (``T10:00:00`` includes that whole second, ``T10:00`` that whole minute,
  ``T10:00:00.250`` ends at that millisecond).

Times are ISO-8601 (what ``datetime.fromisoformat`` reads), UTC unless an offset is given.

The failed list pages by a keyset cursor (``PageCursor``): the (time, id) of the last letter
shown, which the next page starts strictly after, so a letter added or deleted meanwhile never
makes a row repeat or vanish between pages (an offset did). It travels as opaque text
(``encode_cursor``, ``decode_cursor``), the same in the API, the console and the CLI.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from worker.shapes.contract import (
    CURSOR_PATTERN,
    HIGHEST_HTTP_STATUS,
    LOWEST_HTTP_STATUS,
    MAX_CURSOR_LENGTH,
)
from worker.shapes.models import is_message_id
from worker.store.codec import DeadLetter

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)
# How long a time written to this many digits lasts (hours, minutes, seconds), in ms.
_SPAN_OF_DIGITS = {2: 3_600_000, 4: 60_000, 6: 1_000}
_DAY_MS = 86_400_000
_DATE_CHARACTERS = re.compile(r"[0-9W-]*")
_OFFSET = re.compile(r"[Zz+-]")
_MAX_CURSOR_MS = 10**15  # far past any real dead-letter time (year 33658)
_CURSOR_MS = re.compile(r"[0-9]{1,16}")
_CURSOR_TEXT = re.compile(CURSOR_PATTERN)  # unpadded URL-safe base64


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
    company: str | None = None  # ``default`` or a company UUID

    def matches(self, letter: DeadLetter) -> bool:
        """Whether ``letter`` is selected."""
        return (
            (self.partner is None or letter.partner == self.partner)
            and (self.company is None or letter.company == self.company)
            and (self.reason is None or letter.reason == self.reason)
            and (self.template_id is None or letter.template_id == self.template_id)
            and (self.user_id is None or letter.user_id == self.user_id)
            and (self.since_ms is None or letter.dead_ms >= self.since_ms)
            and (self.until_ms is None or letter.dead_ms <= self.until_ms)
            and (self.http_status is None or letter.status == self.http_status)
        )


def parse_time(text: str, *, end: bool = False) -> int:
    """An ISO-8601 date or date-time as epoch milliseconds, UTC unless it has an offset.

    ``end``: the last millisecond of what ``text`` names (a date: its day; a date-time: its
    hour, minute or second, as written; with a fraction of a second: that instant), for the
    upper bound of a range. Raises ``ValueError`` when ``text`` is not one.
    """
    value = text.strip()
    try:
        moment = datetime.fromisoformat(value)
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        ms = (moment - _EPOCH) // _MS
    except (ValueError, OverflowError) as error:
        raise ValueError(f"{text!r} is not an ISO-8601 date or date-time") from error
    return ms + _span_ms(value) - 1 if end else ms


def _span_ms(value: str) -> int:
    # How long the time ``value`` names lasts, by what it writes after the date: nothing (a
    # day), hours, minutes or seconds, or a fraction of a second (the instant itself).
    date_end = _DATE_CHARACTERS.match(value)
    assert date_end is not None  # the pattern matches the empty string
    clock = value[date_end.end() + 1 :]
    if not clock:
        return _DAY_MS
    clock = _OFFSET.split(clock, maxsplit=1)[0]
    if "." in clock or "," in clock:
        return 1
    return _SPAN_OF_DIGITS.get(len(clock.replace(":", "")), 1)


def read_filter(
    *,
    reason: str | None = None,
    template: str | None = None,
    user: str | None = None,
    partner: str | None = None,
    since: str | None = None,
    until: str | None = None,
    http_status: str | None = None,
    company: str | None = None,
) -> tuple[DeadLetterFilter, list[str]]:
    """The filter that what a person typed means, and the names of the values it could not use.

    None (not given) matches all, and so does an empty reason, template, user, partner or
    company.
    ``since`` and ``until`` go through ``parse_time`` (``until`` to the end of what it names),
    ``http_status`` must be a status 100..599; a value given that is not one (an empty one
    included) is left out of the filter and its name (``since``, ``until``, ``http_status``)
    listed, in that order, for the caller to refuse or report as its door does. The reason,
    template, user, partner and company are taken as given (a door that knows their valid
    values checks them first: ``worker.rules.validation.company_problem`` for a company).
    """
    refused: list[str] = []
    bounds: dict[str, int | None] = {"since": None, "until": None}
    for name, text in (("since", since), ("until", until)):
        if text is not None:
            try:
                bounds[name] = parse_time(text, end=name == "until")
            except ValueError:
                refused.append(name)
    status = None
    if http_status is not None:
        if (
            http_status.isascii()
            and http_status.isdigit()
            and LOWEST_HTTP_STATUS <= int(http_status) <= HIGHEST_HTTP_STATUS
        ):
            status = int(http_status)
        else:
            refused.append("http_status")
    selection = DeadLetterFilter(
        reason=reason or None,
        template_id=template or None,
        user_id=user or None,
        since_ms=bounds["since"],
        partner=partner or None,
        http_status=status,
        until_ms=bounds["until"],
        company=company or None,
    )
    return selection, refused


@dataclass(frozen=True, slots=True)
class PageCursor:
    """Where a page of the failed list ended: the last letter's dead-letter time and id.

    The list is ordered newest first by (time, id), as the dead-letter index orders it; the
    next page holds the letters strictly after this pair in that order.
    """

    dead_ms: int
    letter_id: str


def encode_cursor(cursor: PageCursor) -> str:
    """The cursor as opaque, URL-safe text (base64 of ``time:id``, unpadded)."""
    raw = f"{cursor.dead_ms}:{cursor.letter_id}".encode("ascii")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def decode_cursor(text: str) -> PageCursor | None:
    """The cursor ``encode_cursor`` wrote as ``text``; None when ``text`` is not one."""
    value = text.strip()
    if len(value) > MAX_CURSOR_LENGTH or not _CURSOR_TEXT.fullmatch(value):
        return None
    try:
        raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)).decode("ascii")
    except (binascii.Error, ValueError):
        return None
    ms, _, letter_id = raw.partition(":")
    if not _CURSOR_MS.fullmatch(ms) or not is_message_id(letter_id):
        return None
    dead_ms = int(ms)
    if dead_ms > _MAX_CURSOR_MS:
        return None
    return PageCursor(dead_ms, letter_id)
