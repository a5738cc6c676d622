"""Bulk intake at the gateway (issue 22, item 4): ``POST /messages/batch`` over real HTTP on
loopback, real Redis, and a real worker delivering to the sandbox.

Each message is validated on its own: the valid ones are recorded (one Redis round trip) and
delivered once each, the invalid ones are answered with their errors and nothing of them is
recorded or sent. A request refused whole (too many messages, too large, a company not granted
or unknown, not an array) records nothing at all.
"""

from __future__ import annotations

import uuid
from collections import Counter
from typing import Any

import httpx
import pytest

from tests.harness import OPERATOR, PARTNER, wait_for
from tests.harness import app_settings as _settings
from tests.harness import message_keys as _message_keys
from tests.harness import request_body as _body
from worker.shapes.models import is_message_id

BATCH = "/messages/batch"
GRANTED = str(uuid.uuid4())  # granted to PARTNER's bare key (partner ``gateway``), not connected
NOT_GRANTED = str(uuid.uuid4())
BATCH_BODY_LIMIT = 128 * 1024
HEADER = "Concur-Company-Id"


@pytest.fixture(scope="module")
def app_settings() -> Any:
    """The tests' service settings, with a grant to one company and a small bulk body bound."""
    return _settings(
        partner_companies=f"gateway={GRANTED}",
        service_max_batch_body_bytes=BATCH_BODY_LIMIT,
    )


def _item(user: str, **changes: Any) -> dict[str, Any]:
    return {"userId": user, **_body(), **changes}


def _codes(errors: list[dict[str, str]]) -> list[str]:
    for error in errors:
        assert set(error) == {"errorId", "errorCode", "errorMessage"}
        uuid.UUID(error["errorId"])
    return [error["errorCode"] for error in errors]


def _refused_whole(response: httpx.Response) -> list[str]:
    body = response.json()
    assert set(body) == {"errors"}, body
    return _codes(body["errors"])


# Invalid messages of five kinds, with the errors each must be answered with.
INVALID: list[tuple[Any, list[str]]] = [
    ("templateId", ["TEMPLATE_NOT_ALLOWED"]),
    ("sessionId", ["MISSING_FIELD"]),
    ("userId", ["INVALID_USER_ID"]),
    ("extra", ["UNKNOWN_FIELD"]),
    ("not-an-object", ["INVALID_FIELD"]),
]


def _invalid(kind: str, user: str) -> Any:
    if kind == "templateId":
        return _item(user, templateId="evil")
    if kind == "sessionId":
        item = _item(user)
        del item["sessionId"]
        return item
    if kind == "userId":
        return _item("")
    if kind == "extra":
        return _item(user, priority="high")
    return ["not", "an", "object"]


@pytest.mark.usefixtures("celery_worker_process")
def test_a_bulk_of_500_mixed_queues_and_delivers_each_valid_one_once_and_refuses_the_rest(
    http, runtime, sandbox, user_id
):
    items: list[Any] = []
    expected: dict[int, list[str]] = {}  # index -> the errors of an invalid message
    for index in range(500):
        if index % 5 == 4:  # every fifth: 100 invalid, 20 of each kind
            kind, codes = INVALID[(index // 5) % len(INVALID)]
            items.append(_invalid(kind, user_id))
            expected[index] = codes
        else:
            items.append(_item(user_id, sessionId=f"bulk-{index}"))
    before = _message_keys(runtime)

    response = http.post(BATCH, json=items, headers=PARTNER)

    assert response.status_code == 207, response.text
    assert response.headers["content-type"] == "application/json; charset=utf-8"
    body = response.json()
    assert (body["accepted"], body["refused"]) == (400, 100)
    assert [result["index"] for result in body["results"]] == list(range(500))
    ids: dict[str, str] = {}  # session -> id
    for index, result in enumerate(body["results"]):
        if index in expected:
            assert set(result) == {"index", "errors"}, result
            assert _codes(result["errors"]) == expected[index], (index, result)
        else:
            assert result == {
                "index": index,
                "id": result["id"],
                "status": "queued",
                "duplicate": False,
            }
            assert is_message_id(result["id"])
            ids[items[index]["sessionId"]] = result["id"]
    assert len(set(ids.values())) == 400
    # Nothing was recorded for the invalid ones: exactly the 400 valid messages are new.
    assert _message_keys(runtime) == before + 400

    def all_delivered() -> bool:
        states = [runtime.store.status(ident) for ident in ids.values()]
        return all(state and state.get("state") == "delivered" for state in states)

    wait_for(all_delivered, timeout=180, interval=0.5, what="the 400 valid messages delivered")
    sent = Counter(record["body"]["sessionId"] for record in sandbox.requests(user_id=user_id))
    assert sent == Counter(set(ids)), "each valid message posted exactly once, nothing else"


def test_all_valid_is_202_and_the_same_batch_again_is_all_duplicates(http, runtime, user_id):
    items = [_item(user_id) for _ in range(3)]
    items.append(dict(items[0]))  # the same message twice in one request: one message
    before = _message_keys(runtime)
    first = http.post(BATCH, json=items, headers=PARTNER)
    assert first.status_code == 202, first.text
    results = first.json()["results"]
    assert [r["duplicate"] for r in results] == [False, False, False, True]
    assert results[3]["id"] == results[0]["id"]
    assert _message_keys(runtime) == before + 3
    again = http.post(BATCH, json=items, headers=PARTNER)
    assert again.status_code == 202, again.text
    assert [r["id"] for r in again.json()["results"]] == [r["id"] for r in results]
    assert all(r["duplicate"] for r in again.json()["results"])
    assert _message_keys(runtime) == before + 3


def test_501_messages_are_refused_whole_413_and_nothing_is_queued(http, runtime, user_id):
    before = _message_keys(runtime)
    response = http.post(BATCH, json=[_item(user_id) for _ in range(501)], headers=PARTNER)
    assert response.status_code == 413, response.text
    assert _refused_whole(response) == ["TOO_MANY_MESSAGES"]
    assert "500" in response.json()["errors"][0]["errorMessage"]
    assert _message_keys(runtime) == before


def test_a_body_over_the_bulk_bound_is_413_and_the_bound_is_the_bulk_setting(
    http, runtime, user_id
):
    before = _message_keys(runtime)
    long_session = "s" * 200
    big = [_item(user_id, sessionId=f"{long_session}-{i}") for i in range(500)]
    too_large = http.post(BATCH, json=big, headers=PARTNER)
    assert too_large.status_code == 413, too_large.text
    assert _refused_whole(too_large) == ["PAYLOAD_TOO_LARGE"]
    assert str(BATCH_BODY_LIMIT) in too_large.json()["errors"][0]["errorMessage"]
    assert _message_keys(runtime) == before
    # Larger than the one-message bound (MAX_BODY), within the bulk one: accepted.
    fits = http.post(BATCH, json=big[:300], headers=PARTNER)
    assert fits.status_code == 202, fits.text
    assert _message_keys(runtime) == before + 300


def test_a_company_not_granted_or_unknown_is_refused_whole_and_nothing_is_queued(
    http, runtime, user_id
):
    items = [_item(user_id) for _ in range(5)] + [_item(user_id, templateId="evil")]
    before = _message_keys(runtime)
    refused = http.post(BATCH, json=items, headers={**PARTNER, HEADER: NOT_GRANTED})
    assert refused.status_code == 403, refused.text
    assert _refused_whole(refused) == ["COMPANY_NOT_GRANTED"]
    unknown = http.post(BATCH, json=items, headers={**PARTNER, HEADER: GRANTED})
    assert unknown.status_code == 422, unknown.text
    assert _refused_whole(unknown) == ["UNKNOWN_COMPANY"]
    assert _message_keys(runtime) == before


@pytest.mark.parametrize(
    ("raw", "status", "codes"),
    [
        (b"[", 400, ["INVALID_JSON"]),
        (b"[]", 400, ["INVALID_BATCH"]),
        (b'{"userId": "u", "sessionId": "s"}', 400, ["INVALID_BATCH"]),
        (b'"text"', 400, ["INVALID_BATCH"]),
    ],
)
def test_a_body_that_is_not_an_array_of_messages_is_400(http, runtime, raw, status, codes):
    before = _message_keys(runtime)
    response = http.post(
        BATCH, content=raw, headers={**PARTNER, "Content-Type": "application/json"}
    )
    assert response.status_code == status, response.text
    assert _refused_whole(response) == codes
    assert _message_keys(runtime) == before


def test_the_bulk_route_has_the_gateway_keys_and_content_type(http, user_id):
    items = [_item(user_id)]
    assert http.post(BATCH, json=items).status_code == 401
    assert http.post(BATCH, json=items, headers=OPERATOR).status_code == 403
    wrong_type = http.post(BATCH, content=b"[]", headers={**PARTNER, "Content-Type": "text/plain"})
    assert wrong_type.status_code == 415
    assert http.get(BATCH, headers=PARTNER).status_code == 404  # GET /messages/{id}: no such id


def test_expires_at_gives_every_message_of_the_batch_its_deadline(http, runtime, user_id):
    deadline = "2099-01-01T00:00:00Z"
    items = [_item(user_id) for _ in range(2)]
    answer = http.post(BATCH, json=items, headers={**PARTNER, "Expires-At": deadline})
    assert answer.status_code == 202, answer.text
    for result in answer.json()["results"]:
        status = http.get(f"/messages/{result['id']}", headers=PARTNER)
        assert status.status_code == 200, status.text
        assert status.json()["expiresAt"].startswith("2099-01-01T00:00:00")


def test_an_expires_at_without_a_time_zone_refuses_the_batch_whole(http, runtime, user_id):
    before = _message_keys(runtime)
    answer = http.post(
        BATCH, json=[_item(user_id)], headers={**PARTNER, "Expires-At": "2099-01-01T00:00:00"}
    )
    assert answer.status_code == 400, answer.text
    assert _refused_whole(answer) == ["INVALID_DEADLINE"]
    assert _message_keys(runtime) == before
