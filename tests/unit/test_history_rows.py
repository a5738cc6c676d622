"""The history writer's rows from an outbox entry: the JSON form and the older form of fields."""

from __future__ import annotations

import json

from worker.store.history import Rows

REQUEST = {
    "userId": "u1",
    "sessionId": "s1",
    "templateId": "expense-approved",
    "context": {"url": "https://app.example.com/reports/1"},
}
FIELDS = {
    "id": "m1",
    "k": "1",
    "at": "1700000000000",
    "e": "|1|delivered|202|http_202|20|cid-1",
    "st": "delivered",
    "rs": "",
    "hs": "",
    "ci": "",
    "na": "",
    "rp": "0",
    "cr": "1699999999000",
    "up": "1700000000020",
    "rq": json.dumps(REQUEST),
}


def _rows(fields: dict[str, str]) -> Rows:
    rows = Rows()
    rows.add(fields)
    return rows


def test_a_json_entry_gives_the_rows_its_fields_give() -> None:
    by_fields = _rows(FIELDS)
    by_json = _rows({"j": json.dumps(FIELDS)})
    assert by_json.attempts == by_fields.attempts
    assert by_json.outcomes == by_fields.outcomes
    assert by_json.attempts == []  # a first-attempt delivery: its outcome row holds the attempt
    assert len(by_json.outcomes) == 1
    outcome = by_json.outcomes[0]
    assert outcome[Rows.OUTCOME_COLUMNS.index("attempt_ms")] == 20
    assert outcome[Rows.OUTCOME_COLUMNS.index("attempt_at")].timestamp() == 1700000000
    assert outcome[Rows.OUTCOME_COLUMNS.index("message_id")] == "m1"
    assert outcome[Rows.OUTCOME_COLUMNS.index("state")] == "delivered"
    assert outcome[Rows.OUTCOME_COLUMNS.index("user_id")] == "u1"


def test_an_attempt_alone_in_json_has_no_outcome() -> None:
    attempt = {"id": "m2", "k": "1", "at": "1700000000000", "e": FIELDS["e"], "p": "acme"}
    attempt["t"] = "expense-approved"
    rows = _rows({"j": json.dumps(attempt)})
    assert rows.outcomes == []
    assert [row[Rows.ATTEMPT_COLUMNS.index("partner")] for row in rows.attempts] == ["acme"]


def test_only_a_plain_first_attempt_delivery_is_held_in_its_outcome() -> None:
    later = {**FIELDS, "k": "2", "e": "|2|delivered|202|http_202|20|cid-1"}
    other_cause = {**FIELDS, "e": "|1|delivered|202|slow|20|cid-1"}
    for fields in (later, other_cause):
        rows = _rows({"j": json.dumps(fields)})
        assert len(rows.attempts) == 1
        assert rows.outcomes[0][Rows.OUTCOME_COLUMNS.index("attempt_at")] is None
