"""The stored form of records, attempts and dead letters, read and written one way (pure)."""

from __future__ import annotations

import json
import uuid

from worker.store.codec import (
    AttemptRecord,
    DeadLetter,
    StatusRecord,
    attempt_entry,
    expand_record,
    long_cid,
    request_fields,
    request_of,
    short_cid,
)

USUAL = {
    "userId": "u1",
    "sessionId": "s1",
    "templateId": "welcome",
    "context": {"url": "https://app.example.com/r/1"},
}


def test_a_usual_request_is_kept_in_compact_fields_and_read_back_whole() -> None:
    fields = request_fields({**USUAL, "partner": "acme"})
    assert fields == ["u", "u1", "s", "s1", "t", "welcome", "url", "https://app.example.com/r/1"]
    record = dict(zip(fields[::2], fields[1::2], strict=True)) | {"partner": "acme"}
    assert request_of(record) == {**USUAL, "partner": "acme"}


def test_a_request_of_another_shape_is_kept_as_json() -> None:
    odd = {**USUAL, "extra": [1, 2]}
    fields = request_fields(odd)
    assert fields[0] == "req" and json.loads(fields[1]) == odd
    assert request_of({"req": fields[1]}) == odd


def test_an_attempt_is_stored_after_its_time_and_read_back_as_the_api_shows_it() -> None:
    cid = str(uuid.uuid4())
    attempt = AttemptRecord(3, 1_700_000_000_500, "retry", 503, "http_503", 42, cid)
    stored = attempt.compact()
    assert stored == f"|3|r|503||42|{short_cid(cid)}"  # the cause http_503 goes without saying
    created = 1_700_000_000_000
    entry = attempt_entry(f"{attempt.at_ms - created}{stored}", created)
    assert entry == json.loads(attempt.to_json())


def test_uuid_correlation_ids_are_shortened_and_others_kept_as_they_came() -> None:
    cid = str(uuid.uuid4())
    assert len(short_cid(cid)) == 23 and long_cid(short_cid(cid)) == cid
    for other in ("cid-1", "~tilde", ""):
        assert long_cid(short_cid(other)) == other


def test_a_status_record_carries_its_request_parsed() -> None:
    fields = ["u", "u1", "s", "s1", "t", "welcome", "url", "https://app.example.com/r/1"]
    stored = dict(zip(fields[::2], fields[1::2], strict=True))
    stored |= {"state": "delivered", "created": "1000", "du": "250", "a1": "200|1|d|202||12|c1"}
    record = StatusRecord.from_fields(expand_record(stored))
    assert record.request == USUAL
    assert (record.state, record.partner, record.get("updated")) == ("delivered", "default", "1250")
    assert record.attempts == [
        {"n": 1, "at": 1200, "outcome": "delivered", "status": 202, "cause": "http_202",
         "ms": 12, "cid": "c1"}
    ]  # fmt: skip
    assert json.loads(record.to_dict()["req"]) == USUAL


def test_a_dead_letter_whose_request_is_not_json_keeps_it_raw() -> None:
    letter = DeadLetter.from_hash({"id": "m1", "req": "not json", "errors": "[1, {}]", "dead": "5"})
    assert letter.request == {"raw": "not json"}
    assert (letter.errors, letter.dead_ms, letter.user_id) == ([{}], 5, "")
