"""A message names its company (issue 21, C1): grants, admission, ids and the stored form (pure)."""

from __future__ import annotations

import json
import re
import uuid

import pytest
from rich.console import Console

from worker.front import views
from worker.front.stats import build
from worker.rules.allowlist import AllowList
from worker.rules.grants import (
    COMPANY_DISCONNECTED,
    UNKNOWN_COMPANY,
    CompanyGrants,
    admission_problem,
)
from worker.rules.validation import INVALID_COMPANY, InvalidRequest, validate, validate_wire
from worker.settings import SettingsError, load_settings, parse_partner_companies
from worker.shapes.models import DEFAULT_COMPANY, Message, message_id, request_body
from worker.store.codec import DeadLetter, StatusRecord, expand_record, request_fields, request_of
from worker.store.history import Rows
from worker.store.query import read_filter

ACME_1 = "0f3c2f6e-4a1b-4c2d-9e8f-7a6b5c4d3e2f"
ACME_2 = "1f3c2f6e-4a1b-4c2d-9e8f-7a6b5c4d3e2f"
OTHER = "2f3c2f6e-4a1b-4c2d-9e8f-7a6b5c4d3e2f"
ALLOW = AllowList.from_entries(["welcome"], ["app.example.com"])


def _body() -> dict[str, object]:
    return request_body("s-1", "welcome", "https://app.example.com/r/1")


# -- grants: NOTIFY_PARTNER_COMPANIES --------------------------------------------------------------


def test_grants_list_companies_per_partner_and_a_star_for_any():
    grants = parse_partner_companies(f" acme = {ACME_1} | {ACME_2} ,globex=*,, ")
    assert grants == {"acme": (ACME_1, ACME_2), "globex": ("*",)}
    assert load_settings(partner_companies="").partner_companies == {}
    # Given in code, the grants are checked as the variable's text is.
    assert load_settings(partner_companies={"acme": (ACME_1,)}).partner_companies == {
        "acme": (ACME_1,)
    }
    with pytest.raises(SettingsError):
        load_settings(partner_companies={"acme": ("ACME",)})


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("acme", "is not partner=companies"),
        ("Acme=*", "is not partner=companies"),
        ("default=*", "partner 'default' is the one of unkeyed producers"),
        ("acme=*,acme=*", "listed twice"),
        (f"acme=*|{ACME_1}", "'*' alone"),
        (f"acme={ACME_1.upper()}", "in lower case"),
        ("acme=", "'' is not a company id"),
        ("acme=default", "every partner may send to the default company"),
    ],
)
def test_a_grant_that_is_not_one_stops_start_up_naming_the_setting(value, says):
    with pytest.raises(SettingsError) as refused:
        load_settings(partner_companies=value)
    assert str(refused.value).startswith("NOTIFY_PARTNER_COMPANIES: ")
    assert says in str(refused.value)


def test_a_partner_sends_to_the_companies_granted_to_it_and_always_to_the_default_one():
    grants = CompanyGrants.of({"acme": (ACME_1,), "globex": ("*",)})
    assert grants.allows("acme", ACME_1)
    assert not grants.allows("acme", ACME_2)
    assert grants.allows("globex", ACME_2)
    assert not grants.allows("beta", ACME_1)  # not listed: the default company only
    for partner in ("acme", "globex", "beta", None):
        assert grants.allows(partner, DEFAULT_COMPANY)
        assert grants.allows(partner, None)
    # Unkeyed producers (notify send, tasks.enqueue) hold the deployment's own credentials.
    assert grants.allows("default", OTHER)
    assert grants.allows(None, OTHER)


def test_unknown_and_disconnected_companies_are_refused_needs_reconnect_accepted():
    unknown = admission_problem(ACME_1, None)
    assert unknown is not None and unknown.code == UNKNOWN_COMPANY
    assert "notify companies connect" in unknown.message
    gone = admission_problem(ACME_1, "disconnected")
    assert gone is not None and gone.code == COMPANY_DISCONNECTED
    assert admission_problem(ACME_1, "connected") is None
    assert admission_problem(ACME_1, "needs_reconnect") is None  # it waits for a reconnection
    assert admission_problem(DEFAULT_COMPANY, None) is None  # from the settings, never stored


# -- ids -------------------------------------------------------------------------------------------


def test_the_default_companys_ids_are_the_ones_every_earlier_message_had():
    # Made by the code before companies existed: stored records and idempotency keys stay valid.
    assert message_id("user-1", "s-1", "welcome") == "bwkzaxqmqv3vs7ulq7cnty4n"
    assert message_id("user-1", "s-1", "welcome", "acme") == "kgr6bsxyt4m2ccudvglayhyz"
    assert message_id("user-1", "s-1", "welcome", company=DEFAULT_COMPANY) == (
        "bwkzaxqmqv3vs7ulq7cnty4n"
    )
    assert Message.create("user-1", "s-1", "welcome", None, "acme", None).id == (
        "kgr6bsxyt4m2ccudvglayhyz"
    )


def test_the_same_request_for_two_companies_is_two_messages():
    ids = {
        message_id("user-1", "s-1", "welcome", partner, company)
        for partner in ("default", "acme")
        for company in (DEFAULT_COMPANY, ACME_1, ACME_2)
    }
    assert len(ids) == 6


# -- validation and the wire -----------------------------------------------------------------------


def test_a_message_for_a_company_carries_it_on_the_wire_and_back():
    message = validate("user-1", _body(), ALLOW, partner="acme", company=ACME_1)
    assert message.company == ACME_1
    wire = message.to_wire()
    assert wire["company"] == ACME_1
    assert validate_wire(wire, ALLOW) == message
    plain = validate("user-1", _body(), ALLOW)
    assert "company" not in plain.to_wire()  # the default company's form is the old one
    assert validate("user-1", _body(), ALLOW, company=DEFAULT_COMPANY) == plain


@pytest.mark.parametrize("company", [ACME_1.upper(), "acme", "", " " + ACME_1])
def test_a_company_that_is_not_a_lower_case_uuid_is_an_invalid_request(company):
    with pytest.raises(InvalidRequest) as refused:
        validate("user-1", _body(), ALLOW, company=company)
    assert [problem.code for problem in refused.value.problems] == [INVALID_COMPANY]


def test_a_queued_company_that_is_not_a_string_is_refused():
    with pytest.raises(InvalidRequest):
        validate_wire({"userId": "u", **_body(), "company": 5}, ALLOW)


# -- the stored form -------------------------------------------------------------------------------


def test_a_company_is_stored_compactly_beside_the_request_and_read_back():
    wire = Message.create("user-1", "s-1", "welcome", None, None, ACME_1).to_wire()
    fields = request_fields(wire)
    assert fields[0] != "req" and fields[-2:] == ["company", ACME_1]
    record = dict(zip(fields[::2], fields[1::2], strict=True))
    assert request_of(record) == wire
    expanded = expand_record({**record, "state": "queued"})
    assert expanded["company"] == ACME_1
    assert StatusRecord.from_fields(expanded).company == ACME_1
    old = expand_record({"u": "user-1", "s": "s-1", "t": "welcome", "state": "queued"})
    assert StatusRecord.from_fields(old).company == DEFAULT_COMPANY


def test_a_dead_letter_knows_its_company_and_the_filter_selects_by_it():
    def letter(request: dict[str, object]) -> DeadLetter:
        return DeadLetter.from_hash(
            {"id": uuid.uuid4().hex[:12], "req": json.dumps(request), "dead": "1"}
        )

    mine = letter({"userId": "u", **_body(), "company": ACME_1})
    theirs = letter({"userId": "u", **_body()})
    assert (mine.company, theirs.company) == (ACME_1, DEFAULT_COMPANY)
    only_acme, _ = read_filter(company=ACME_1)
    only_default, _ = read_filter(company=DEFAULT_COMPANY)
    assert [only_acme.matches(each) for each in (mine, theirs)] == [True, False]
    assert [only_default.matches(each) for each in (mine, theirs)] == [False, True]
    anyone, _ = read_filter(company="")
    assert anyone.company is None


def test_the_history_keeps_a_companys_request_whole():
    rows = Rows()
    for request in ({"userId": "u", **_body(), "company": ACME_1}, {"userId": "u", **_body()}):
        rows.add({"id": "m", "k": "1", "at": "1000", "st": "failed", "rq": json.dumps(request)})
    kept = [row[Rows.OUTCOME_COLUMNS.index("request")] for row in rows.outcomes]
    assert kept[0] is not None and kept[0].obj["company"] == ACME_1  # jsonb, as written
    assert kept[1] is None  # the usual shape is kept in columns, as before


# -- views -----------------------------------------------------------------------------------------


def _text(renderable: object) -> str:
    console = Console(width=120, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    console.print(renderable)
    return console.export_text()


def test_notify_status_shows_a_registry_company_and_stays_as_it_was_for_the_default_one():
    for company, shown in ((ACME_1, True), (None, False)):
        wire = Message.create("user-1", "s-1", "welcome", None, None, company).to_wire()
        fields = request_fields(wire)
        record = expand_record(
            {**dict(zip(fields[::2], fields[1::2], strict=True)), "state": "queued"}
        )
        text = _text(views.message_view("id1", StatusRecord.from_fields(record), 0))
        assert bool(re.search(rf"\ncompany +{ACME_1}", text)) is shown
        assert ("company" in text) is shown


def test_stats_list_the_companies_with_the_most_messages_waiting_most_first():
    snapshot = build(
        at_ms=0,
        queue="notifications",
        queue_lengths=[],
        reserved=0,
        live={},
        totals={},
        dead_index_size=0,
        minute_counts=[],
        penalty=None,
        waiting_by_company=[(ACME_1, 7.0), (DEFAULT_COMPANY, 3.0), (ACME_2, 0.0)],
    )
    assert list(snapshot.waiting_by_company.items()) == [(ACME_1, 7), (DEFAULT_COMPANY, 3)]
    text = _text(views.stats_view(snapshot, 15))
    assert re.search(rf"waiting, by company +7  {ACME_1}\s+3  {DEFAULT_COMPANY}\s", text)
