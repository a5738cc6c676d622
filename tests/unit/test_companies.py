"""The company registry's pure parts: ids, states, the answer's shape, the connect body, the
settings that allow a registry, and the terminal views (issue 21 item 1)."""

from __future__ import annotations

import re
import uuid

import pytest
from cryptography.fernet import Fernet
from pydantic import ValidationError

from worker.front import views
from worker.settings import SettingsError, load_settings
from worker.shapes.contract import COMPANY_NAME_PATTERN, CompanyView, ConnectCompany
from worker.shapes.models import COMPANY_STATES, DEFAULT_COMPANY, is_company_id
from worker.store.companies import Company, checked_id, company_of, count_states

COMPANY = "0f3c2f6e-4a1b-4c2d-9e8f-7a6b5c4d3e2f"
KEY = Fernet.generate_key().decode()


@pytest.mark.parametrize("value", [COMPANY, str(uuid.uuid4()), str(uuid.UUID(int=0))])
def test_a_company_id_is_a_uuid_in_canonical_lower_case(value):
    assert is_company_id(value)
    assert checked_id(value) == value


@pytest.mark.parametrize(
    "value",
    [
        COMPANY.upper(),
        "{" + COMPANY + "}",
        COMPANY.replace("-", ""),
        COMPANY + "\n",
        " " + COMPANY,
        COMPANY[:-1],
        DEFAULT_COMPANY,
        "notify:company:x",
        "",
        None,
        5,
    ],
)
def test_anything_else_is_refused(value):
    assert not is_company_id(value)
    if isinstance(value, str):
        with pytest.raises(ValueError, match="UUID in lower case"):
            checked_id(value)


def test_the_path_pattern_takes_default_or_a_company_id_and_nothing_else():
    pattern = re.compile(COMPANY_NAME_PATTERN)
    assert pattern.search(COMPANY) and pattern.search(DEFAULT_COMPANY)
    for other in (COMPANY.upper(), "defaults", "default " + COMPANY, COMPANY + "0"):
        assert not pattern.search(other)


def test_counts_name_every_state_and_ignore_what_is_not_one():
    counts = count_states(["connected", "connected", "disconnected", None, "weird"])
    assert counts == {"connected": 2, "needs_reconnect": 0, "disconnected": 1}
    assert tuple(count_states([])) == COMPANY_STATES


def test_a_stored_hash_reads_as_a_company_and_an_unknown_state_is_never_connected():
    assert company_of(COMPANY, {}) is None
    company = company_of(
        COMPANY,
        {
            "state": "connected",
            "refresh": "f1:sealed",
            "geolocation": "https://us2.api.concursolutions.com",
            "connected_ms": "1764090760118",
            "refreshed_ms": "1764090761000",
            "state_ms": "1764090760118",
            "refresh_expires_ms": "",
            "reason": "connected with a request token",
        },
    )
    assert company is not None and company.state == "connected"
    assert (company.connected_ms, company.refresh_expires_ms) == (1764090760118, None)
    assert "sealed" not in repr(company)  # the token is not part of a Company
    odd = company_of(COMPANY, {"state": "paused"})
    assert odd is not None and odd.state == "needs_reconnect"


def test_the_json_form_is_the_documented_answer_and_never_holds_a_token():
    company = Company(
        COMPANY,
        "needs_reconnect",
        geolocation="https://emea.api.concursolutions.com",
        connected_ms=1764090760118,
        refreshed_ms=None,
        state_ms=1764090999000,
        reason="Concur refused the refresh token (code 108)",
    )
    data = company.to_dict()
    assert data["connectedAt"] == "2025-11-25T17:12:40.118Z"
    assert data["refreshedAt"] is None and data["fromSettings"] is False
    assert not {"refresh", "refreshToken"} & set(data)
    assert CompanyView.model_validate(data).model_dump() == data
    with pytest.raises(ValidationError):
        CompanyView.model_validate({**data, "id": "ACME"})


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"requestToken": "a", "refreshToken": "b"},
        {"requestToken": ""},
        {"requestToken": "a" * 4097},
        {"requestToken": 5},
        {"requestToken": "a", "companyId": COMPANY},
    ],
)
def test_a_connect_body_takes_exactly_one_token(body):
    with pytest.raises(ValidationError) as error:
        ConnectCompany.model_validate(body)
    # What the API reports is built from these, without the input (a secret).
    for item in error.value.errors(include_input=False):
        assert "input" not in item


def test_a_connect_body_with_one_token_is_read():
    assert ConnectCompany.model_validate({"requestToken": "r"}).requestToken == "r"
    assert ConnectCompany.model_validate({"refreshToken": "f"}).refreshToken == "f"


_UNSET = {
    "oauth_client_id": None,
    "oauth_client_secret": None,
    "oauth_company_id": None,
    "oauth_company_auth_token": None,
    "oauth_refresh_token": None,
    "token_encryption_key": None,
}


@pytest.mark.parametrize(
    ("values", "oauth_company"),
    [
        ({}, False),  # NOTIFY_API_TOKEN (the session's) or the sandbox
        (
            {"oauth_client_id": "app", "oauth_client_secret": "s", "token_encryption_key": KEY},
            False,
        ),
        (
            {
                "oauth_client_id": "app",
                "oauth_client_secret": "s",
                "oauth_company_id": COMPANY,
                "oauth_company_auth_token": "t",
                "token_encryption_key": KEY,
            },
            True,
        ),
        (
            {
                "oauth_client_id": "app",
                "oauth_client_secret": "s",
                "oauth_refresh_token": "r",
                "token_encryption_key": KEY,
            },
            True,
        ),
    ],
)
def test_client_credentials_alone_serve_the_registry_and_every_earlier_combination_stays_valid(
    values, oauth_company
):
    settings = load_settings(**{**_UNSET, **values})
    assert settings.has_oauth_company is oauth_company


def test_client_credentials_without_a_key_are_still_refused():
    with pytest.raises(SettingsError, match=r"^NOTIFY_TOKEN_ENCRYPTION_KEY"):
        load_settings(**{**_UNSET, "oauth_client_id": "app", "oauth_client_secret": "s"})


def test_the_views_show_stored_text_as_text_never_as_markup():
    company = Company(
        COMPANY,
        "connected",
        geolocation="https://us2.api.concursolutions.com",
        reason="[bold red]not markup[/]",
        refreshed_ms=1_000,
    )
    default = Company(DEFAULT_COMPANY, "connected", from_settings=True)
    table = views.render(views.companies_table([default, company], 61_000), width=100)
    header, first, second = table.splitlines()
    assert header.split() == ["ID", "STATE", "GEOLOCATION", "CONNECTED", "LAST", "REFRESHED"]
    assert first.split()[:4] == ["default", "(settings)", "connected", "-"]
    assert second.split() == [COMPANY, "connected", "us2", "-", "1", "min", "ago"]
    shown = views.render(views.company_view(company, 61_000), width=100)
    assert "[bold red]not markup[/]" in shown


def test_a_company_that_needs_reconnecting_says_how():
    company = Company(COMPANY, "needs_reconnect", reason="Concur refused the refresh token")
    shown = views.render(views.company_view(company, 0), width=120)
    assert f"notify companies connect {COMPANY} --request-token -" in shown


@pytest.mark.parametrize(
    ("geolocation", "shown"),
    [
        ("https://emea.api.concursolutions.com", "emea"),
        ("https://us2.api.concursolutions.com/", "us2"),
        ("https://xx9.api.concursolutions.com", "xx9.api.concursolutions.com"),
        ("http://127.0.0.1:8099", "127.0.0.1:8099"),
        (None, "-"),
    ],
)
def test_geolocations_are_named_short(geolocation, shown):
    assert views.geolocation_name(geolocation) == shown
