"""The one time parser, the one dead-letter filter and the one page cursor of the API, the
console and the CLI (pure)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from worker.front.notifications import concur_time
from worker.store.codec import DeadLetter
from worker.store.query import (
    DeadLetterFilter,
    PageCursor,
    decode_cursor,
    encode_cursor,
    parse_time,
    read_filter,
)


def _ms(*parts: int) -> int:
    """Epoch ms of a UTC date-time given as (year, month, day, hour, minute, second, µs)."""
    return int(datetime(*parts, tzinfo=UTC).timestamp() * 1000)  # type: ignore[misc]


NOV_25 = _ms(2026, 11, 25)
NOV_26 = _ms(2026, 11, 26)


def _letter(dead_ms: int, **fields: object) -> DeadLetter:
    values: dict[str, object] = {
        "id": "m1",
        "user_id": "u1",
        "request": {"userId": "u1", "templateId": "welcome"},
        "reason": "api_rejected",
        "detail": "",
        "status": 400,
        "errors": [],
        "attempts": 1,
        "first_attempt_ms": dead_ms,
        "last_attempt_ms": dead_ms,
        "dead_ms": dead_ms,
        "created_ms": dead_ms,
        "correlation_id": None,
        "task_id": None,
        "worker": None,
        "replays": 0,
    }
    values.update(fields)
    return DeadLetter(**values)  # type: ignore[arg-type]


def test_until_a_date_is_the_last_millisecond_of_that_day() -> None:
    assert parse_time("2026-11-25", end=True) == NOV_26 - 1
    assert parse_time("20261125", end=True) == NOV_26 - 1


def test_until_a_date_time_is_that_instant_to_the_precision_written() -> None:
    assert parse_time("2026-11-25T10:00:00", end=True) == _ms(2026, 11, 25, 10, 0, 0) + 999
    assert parse_time("2026-11-25T10:05", end=True) == _ms(2026, 11, 25, 10, 5) + 59_999
    assert parse_time("2026-11-25 10:05", end=True) == _ms(2026, 11, 25, 10, 5) + 59_999
    assert parse_time("2026-11-25T10:00:00.250", end=True) == _ms(2026, 11, 25, 10, 0, 0) + 250
    # Midnight written out is that second, not the whole day.
    assert parse_time("2026-11-25T00:00:00Z", end=True) == NOV_25 + 999


def test_since_is_the_first_millisecond_of_what_it_names() -> None:
    assert parse_time("2026-11-25") == NOV_25
    assert parse_time("2026-11-25T10:05") == _ms(2026, 11, 25, 10, 5)
    assert parse_time(" 2026-11-25T10:00:00.250Z ") == _ms(2026, 11, 25, 10, 0, 0) + 250


def test_times_are_utc_unless_they_carry_an_offset() -> None:
    assert parse_time("2026-11-25T10:00:00Z") == parse_time("2026-11-25T10:00:00")
    assert parse_time("2026-11-25T11:00:00+01:00") == _ms(2026, 11, 25, 10)
    assert parse_time("2026-11-25T09:00-01:00", end=True) == _ms(2026, 11, 25, 10) + 59_999


@pytest.mark.parametrize("text", ["", "yesterday", "2026-13-01", "2026-11-25T25:00", "x" * 40])
def test_what_is_not_an_iso_time_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="is not an ISO-8601 date or date-time"):
        parse_time(text)


def test_a_filter_until_a_date_selects_the_whole_day_and_nothing_after() -> None:
    selection, refused = read_filter(until="2026-11-25")
    assert refused == []
    assert selection == DeadLetterFilter(until_ms=NOV_26 - 1)
    assert selection.matches(_letter(NOV_25))
    assert selection.matches(_letter(NOV_26 - 1))
    assert not selection.matches(_letter(NOV_26))


def test_a_filter_until_a_date_time_ends_with_that_second() -> None:
    selection, _ = read_filter(until="2026-11-25T12:00:00")
    noon = _ms(2026, 11, 25, 12)
    assert selection.matches(_letter(noon + 999))
    assert not selection.matches(_letter(noon + 1000))


def test_a_filter_since_a_date_starts_at_its_midnight() -> None:
    selection, _ = read_filter(since="2026-11-25", until="2026-11-25")
    assert not selection.matches(_letter(NOV_25 - 1))
    assert selection.matches(_letter(NOV_25))
    assert selection.matches(_letter(NOV_26 - 1))


def test_values_not_given_match_all_and_empty_words_are_not_given() -> None:
    assert read_filter() == (DeadLetterFilter(), [])
    assert read_filter(reason="", template="", user="", partner="") == (DeadLetterFilter(), [])
    selection, _ = read_filter(reason="api_rejected", template="t", user="u", partner="acme")
    assert selection == DeadLetterFilter(
        reason="api_rejected", template_id="t", user_id="u", partner="acme"
    )


def test_bad_values_are_left_out_and_named_in_order() -> None:
    selection, refused = read_filter(
        since="yesterday", until="", http_status="99", reason="api_rejected"
    )
    assert refused == ["since", "until", "http_status"]
    assert selection == DeadLetterFilter(reason="api_rejected")
    assert read_filter(http_status="503")[0].http_status == 503
    assert read_filter(http_status="\uff15\uff10\uff13")[1] == ["http_status"]  # not ASCII digits


def test_a_filter_matches_on_every_field_it_sets() -> None:
    letter = _letter(NOV_25, partner="acme")
    assert DeadLetterFilter(partner="acme", http_status=400, reason="api_rejected").matches(letter)
    assert not DeadLetterFilter(partner="beta").matches(letter)
    assert not DeadLetterFilter(http_status=503).matches(letter)
    assert DeadLetterFilter(template_id="welcome", user_id="u1").matches(letter)
    assert not DeadLetterFilter(template_id="other").matches(letter)


@pytest.mark.parametrize(
    "cursor",
    [
        PageCursor(0, "a"),
        PageCursor(NOV_25, "3auaf7ieymuujnmg5dqwalna"),
        PageCursor(10**15, "x" * 64),
        PageCursor(1, "A-b_9"),
    ],
)
def test_a_cursor_reads_back_as_written_and_is_url_safe_text(cursor: PageCursor) -> None:
    text = encode_cursor(cursor)
    assert decode_cursor(text) == cursor
    assert text.isascii() and all(ch.isalnum() or ch in "-_" for ch in text)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "12",  # an old offset cursor
        "-1",
        "!!!!",
        encode_cursor(PageCursor(5, "abc")) + "=",  # padding is never written
        encode_cursor(PageCursor(5, "abc")) + " x",
        "a" * 121,
        # well-formed base64 of what is not a cursor
        "MTIzOmE6Yg",  # 123:a:b (":" is not in an id)
        "eDph",  # x:a (time not a number)
        "MTIzOg",  # 123: (no id)
        "MTAwMDAwMDAwMDAwMDAwMTph",  # 1000000000000001:a (past any time)
        "w6k6YQ",  # not ASCII once decoded
    ],
)
def test_text_that_is_not_a_cursor_we_wrote_reads_as_none(text: str) -> None:
    assert decode_cursor(text) is None


def test_event_time_is_the_seeds_form_utc_without_an_offset() -> None:
    assert concur_time(_ms(2012, 11, 14, 19, 45, 25) + 999) == "2012-11-14T19:45:25"
    assert concur_time(None) is None
    assert concur_time(0) is None
