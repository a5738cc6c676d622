"""Issue 22, items 2 and 3 (pure): what "the same message" is, explicit keys, deadlines (pure)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from worker.delivery import ends
from worker.delivery.ends import Attempt, DeadLetter
from worker.rules import deadlines, outcomes
from worker.rules.allowlist import AllowList
from worker.rules.retries import RetryPolicy
from worker.rules.validation import Problem
from worker.settings import SettingsError, load_settings, parse_partner_expiry
from worker.shapes.models import (
    Message,
    idempotency_digest,
    is_idempotency_key,
    keyed_message_id,
    message_id,
    request_fingerprint,
)
from worker.store import keys
from worker.store.codec import Claim, claim_from

POLICY = RetryPolicy(max_attempts=3, backoff_base_seconds=10, backoff_max_seconds=60)
ALLOWLIST = AllowList.from_entries(["welcome"], ["app.example.com"])
DEADLINE = 1_800_000_000_000
URL = "https://app.example.com/r/1"


# -- the implicit rule: the whole request ----------------------------------------------------------


def test_the_url_is_part_of_the_implicit_id_and_ids_without_one_are_unchanged() -> None:
    # Made before the URL counted: ids of requests without a URL must stay what they were.
    assert message_id("user-1", "s-1", "welcome") == "bwkzaxqmqv3vs7ulq7cnty4n"
    assert message_id("user-1", "s-1", "welcome", "acme") == "kgr6bsxyt4m2ccudvglayhyz"
    one = message_id("user-1", "s-1", "welcome", url=URL)
    other = message_id("user-1", "s-1", "welcome", url=URL + "x")
    assert len({one, other, message_id("user-1", "s-1", "welcome")}) == 3
    assert Message.create("user-1", "s-1", "welcome", URL).id == one
    # A URL is never taken for a company (nor a company for a URL).
    company = "0f3c2f6e-4a1b-4c2d-9e8f-7a6b5c4d3e2f"
    assert message_id("u", "s", "welcome", url=company) != message_id(
        "u", "s", "welcome", None, company
    )


# -- explicit keys ---------------------------------------------------------------------------------


def test_a_keyed_id_follows_the_key_and_the_request_and_never_meets_an_implicit_one() -> None:
    message = Message.create("user-1", "s-1", "welcome", URL, "acme")
    keyed = message.keyed("order-1")
    assert keyed.id == message.keyed("order-1").id  # stable
    assert keyed.id != message.id
    assert keyed.id != message.keyed("order-2").id
    other_body = Message.create("user-1", "s-1", "welcome", URL + "x", "acme").keyed("order-1")
    assert other_body.id != keyed.id and other_body.fingerprint != keyed.fingerprint
    # Per partner: another partner's same key and request is another message.
    assert Message.create("user-1", "s-1", "welcome", URL, "beta").keyed("order-1").id != keyed.id
    assert keyed.idempotency_key == "order-1"
    assert keyed_message_id("acme", "order-1", keyed.fingerprint or "") == keyed.id


def test_the_fingerprint_holds_the_given_deadline_not_a_default() -> None:
    message = Message.create("user-1", "s-1", "welcome", URL)
    wire = message.to_wire()
    assert request_fingerprint(wire, None) != request_fingerprint(wire, DEADLINE)
    # A deadline the partner's default made (now + N) is not the caller's: same fingerprint.
    assert message.expiring(DEADLINE).keyed("k").id == message.keyed("k").id
    assert message.keyed("k", DEADLINE).id != message.keyed("k").id


@pytest.mark.parametrize(
    ("key", "valid"),
    [
        ("a", True),
        ("x" * 255, True),
        ("report-8812:approved", True),
        ("", False),
        ("x" * 256, False),
        ("has space", False),
        ("caf\u00e9", False),
        ("tab\t", False),
    ],
)
def test_idempotency_keys_are_1_to_255_visible_ascii_characters(key: str, valid: bool) -> None:
    assert is_idempotency_key(key) is valid


def test_a_key_reaches_its_redis_key_name_as_a_digest_under_its_partner() -> None:
    digest = idempotency_digest("any key: even this one * ?")
    assert len(digest) == 32 and digest.isalnum()
    assert keys.idempotency("acme", digest) == f"notify:idem:acme:{digest}"


# -- deadlines ------------------------------------------------------------------------------------


def test_a_deadline_is_an_rfc3339_time_with_a_time_zone() -> None:
    assert deadlines.parse_deadline("2027-01-15T08:00:00Z") == DEADLINE
    assert deadlines.parse_deadline("2027-01-15T09:00:00+01:00") == DEADLINE
    naive = deadlines.parse_deadline("2027-01-15T08:00:00")
    assert isinstance(naive, Problem) and naive.code == deadlines.INVALID_DEADLINE
    assert isinstance(deadlines.parse_deadline("tomorrow"), Problem)
    assert deadlines.deadline_of(datetime(2027, 1, 15, 8, tzinfo=UTC)) == DEADLINE
    assert (
        deadlines.deadline_of(datetime(2027, 1, 15, 3, tzinfo=timezone(timedelta(hours=-5))))
        == DEADLINE
    )
    assert isinstance(deadlines.deadline_of(datetime(2027, 1, 15, 8)), Problem)


def test_a_deadline_already_passed_is_refused() -> None:
    assert deadlines.future_deadline(DEADLINE, now_ms=DEADLINE - 1) is None
    late = deadlines.future_deadline(DEADLINE, now_ms=DEADLINE)
    assert late is not None and late.code == deadlines.INVALID_DEADLINE


def test_a_partner_default_deadline_is_its_own_entry_else_the_star_entry_else_none() -> None:
    expiry = {"acme": 60.0, "*": 3600.0}
    assert deadlines.default_deadline("acme", expiry, now_ms=1000) == 61_000
    assert deadlines.default_deadline("beta", expiry, now_ms=1000) == 3_601_000
    assert deadlines.default_deadline("beta", {"acme": 60.0}, now_ms=1000) is None
    assert deadlines.default_deadline("default", {}, now_ms=1000) is None


def test_the_partner_expiry_setting_is_read_and_bad_entries_are_named() -> None:
    assert parse_partner_expiry("acme=3600, default=600,*=86400") == {
        "acme": 3600.0,
        "default": 600.0,
        "*": 86400.0,
    }
    for bad in ("acme", "acme=0", "acme=soon", "Bad Name=5", "acme=1,acme=2"):
        with pytest.raises(ValueError):
            parse_partner_expiry(bad)
    assert load_settings(partner_expiry_seconds="beta=5").partner_expiry_seconds == {"beta": 5.0}


def test_the_idempotency_window_is_its_own_setting_and_never_outlives_the_record() -> None:
    assert load_settings().idempotency_window == 86400
    assert load_settings(status_ttl_seconds=3600).idempotency_window == 3600
    assert load_settings(idempotency_window_seconds=600).idempotency_window == 600
    with pytest.raises(SettingsError, match="NOTIFY_IDEMPOTENCY_WINDOW_SECONDS"):
        load_settings(status_ttl_seconds=3600, idempotency_window_seconds=7200)


# -- the expired end -------------------------------------------------------------------------------


def test_a_claim_past_the_deadline_ends_as_a_dead_letter_expired_without_a_post() -> None:
    request = Message.create("user-1", "s-1", "welcome", URL).to_wire()
    claim = Claim("expired", 2, request, expires_ms=DEADLINE)
    taken = ends.after_claim(
        "m-1", "o-1", claim, policy=POLICY, allowlist=ALLOWLIST, now_ms=DEADLINE
    )
    assert isinstance(taken, DeadLetter)
    assert taken.failure.reason == outcomes.EXPIRED and taken.entry is None
    assert (taken.message_id, taken.owner) == ("m-1", "o-1")
    assert "2027-01-15T08:00:00Z" in taken.failure.detail
    assert outcomes.EXPIRED in outcomes.REASONS


def test_a_post_is_not_started_once_its_deadline_passed_while_it_waited() -> None:
    request = Message.create("user-1", "s-1", "welcome", URL).to_wire()
    claim = Claim("go", 1, request, expires_ms=DEADLINE)
    attempt = ends.after_claim(
        "m-1", "o-1", claim, policy=POLICY, allowlist=ALLOWLIST, now_ms=DEADLINE - 5000
    )
    assert isinstance(attempt, Attempt)
    assert ends.past_deadline(attempt, now_ms=DEADLINE - 1) is None
    late = ends.past_deadline(attempt, now_ms=DEADLINE)
    assert isinstance(late, DeadLetter) and late.failure.reason == outcomes.EXPIRED
    without = ends.after_claim(
        "m-1", "o-1", Claim("go", 1, request), policy=POLICY, allowlist=ALLOWLIST, now_ms=0
    )
    assert isinstance(without, Attempt)
    assert ends.past_deadline(without, now_ms=DEADLINE * 10) is None


def test_the_claim_reply_carries_the_deadline() -> None:
    request = '{"userId":"u","sessionId":"s","templateId":"welcome","context":{}}'
    assert claim_from(["go", "1", request, str(DEADLINE)]).expires_ms == DEADLINE
    assert claim_from(["go", "1", request, ""]).expires_ms is None
    assert claim_from(["go", "1", request]).expires_ms is None  # a reply of before
    expired = claim_from(["expired", "0", request, str(DEADLINE)])
    assert (expired.verdict, expired.attempt, expired.expires_ms) == ("expired", 0, DEADLINE)
    assert claim_from(["done", "cancelled"]) == Claim("done", state="cancelled")
