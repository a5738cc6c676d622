"""The sandbox's pure parts for many companies: no server, no Redis, no sleeps (issue 21)."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from sandbox.companies import parse_companies, parse_geolocation_name
from sandbox.ledger import Ledger
from sandbox.oauth import TokenEndpoint
from sandbox.plans import Plan, parse_geo_script, parse_script, pick_at

GEOLOCATIONS = {"us", "emea"}
ROOTS = {"us": "http://127.0.0.1:1", "emea": "http://127.0.0.1:2"}
NOW = 1_000_000.0


def spec(company: str, geolocation: str = "us", **extra: Any) -> dict[str, Any]:
    return {"id": company, "geolocation": geolocation, "requestToken": "rq", **extra}


def password(company: str, request_token: str = "rq") -> dict[str, str]:
    return {
        "grant_type": "password",
        "client_id": "app",
        "client_secret": "sandbox-client-secret",
        "username": company,
        "password": request_token,
        "credtype": "authtoken",
    }


def refresh(token: str) -> dict[str, str]:
    return {
        "grant_type": "refresh_token",
        "client_id": "app",
        "client_secret": "sandbox-client-secret",
        "refresh_token": token,
    }


def endpoint_with(*companies: tuple[str, str]) -> TokenEndpoint:
    endpoint = TokenEndpoint()
    specs = parse_companies({"companies": [spec(c, g) for c, g in companies]}, GEOLOCATIONS)
    endpoint.create_companies(specs, NOW)
    return endpoint


def test_a_company_is_named_by_its_canonical_uuid_and_a_known_geolocation() -> None:
    good = str(uuid.uuid4())
    assert [s.id for s in parse_companies(spec(good), GEOLOCATIONS)] == [good]
    for bad, words in [
        (spec(good.upper()), "canonical lowercase"),
        (spec("acme"), "UUID"),
        (spec(good, "apj"), "geolocation"),
        ({"id": good, "geolocation": "us"}, "requestToken"),
        ({"companies": [spec(good), spec(good)]}, "twice"),
    ]:
        with pytest.raises(ValueError, match=words):
            parse_companies(bad, GEOLOCATIONS)
    with pytest.raises(ValueError, match="lowercase letters"):
        parse_geolocation_name("EMEA")


def test_a_companys_tokens_come_from_its_request_token_and_answer_its_geolocation() -> None:
    acme, globex = str(uuid.uuid4()), str(uuid.uuid4())
    endpoint = endpoint_with((acme, "us"), (globex, "emea"))
    status, doc = endpoint.grant(password(globex), NOW, ROOTS["us"], at="emea", roots=ROOTS)
    assert (status, doc["geolocation"]) == (200, ROOTS["emea"])
    found = endpoint.companies.access(doc["access_token"])
    assert found is not None and found[0].id == globex
    assert endpoint.grant(password(acme, "wrong"), NOW, ROOTS["us"], at="us", roots=ROOTS)[0] == 400
    assert endpoint.stats(NOW)["grants"] == {"password": 1}


def test_a_token_request_at_the_wrong_geolocation_is_code_16_and_spends_nothing() -> None:
    globex = str(uuid.uuid4())
    endpoint = endpoint_with((globex, "emea"))
    _, first = endpoint.grant(password(globex), NOW, ROOTS["us"], at="emea", roots=ROOTS)
    status, doc = endpoint.grant(
        refresh(first["refresh_token"]), NOW, ROOTS["us"], at="us", roots=ROOTS
    )
    assert (status, doc["code"], doc["geolocation"]) == (400, 16, ROOTS["emea"])
    status, _ = endpoint.grant(
        refresh(first["refresh_token"]), NOW, ROOTS["us"], at="emea", roots=ROOTS
    )
    assert status == 200


def test_revoking_one_companys_refresh_tokens_leaves_the_others_alone() -> None:
    acme, globex = str(uuid.uuid4()), str(uuid.uuid4())
    endpoint = endpoint_with((acme, "us"), (globex, "us"))
    tokens = {
        c: endpoint.grant(password(c), NOW, ROOTS["us"], at="us", roots=ROOTS)[1]
        for c in (acme, globex)
    }
    company = endpoint.companies.get(acme)
    assert company is not None
    endpoint.companies.update(company, {"revokeRefreshTokens": True}, GEOLOCATIONS)
    status, doc = endpoint.grant(
        refresh(tokens[acme]["refresh_token"]), NOW, ROOTS["us"], at="us", roots=ROOTS
    )
    assert (status, doc["code"]) == (400, 108)
    assert company.codes == {108: 1} and company.token_requests == 2
    status, _ = endpoint.grant(
        refresh(tokens[globex]["refresh_token"]), NOW, ROOTS["us"], at="us", roots=ROOTS
    )
    assert status == 200
    endpoint.companies.update(company, {"revokeAccessTokens": True}, GEOLOCATIONS)
    assert endpoint.companies.access(tokens[acme]["access_token"]) is None
    assert endpoint.companies.access(tokens[globex]["access_token"]) is not None


def test_an_expired_access_token_is_dropped_when_the_company_gets_a_new_one() -> None:
    acme = str(uuid.uuid4())
    endpoint = endpoint_with((acme, "us"))
    _, old = endpoint.grant(password(acme), NOW, ROOTS["us"], at="us", roots=ROOTS)
    later = NOW + 7200  # past the default hour
    endpoint.grant(password(acme), later, ROOTS["us"], at="us", roots=ROOTS)
    assert endpoint.companies.access(old["access_token"]) is None


def test_the_ledger_counts_per_company_and_geolocation() -> None:
    ledger = Ledger(10)
    acme = str(uuid.uuid4())
    for company, geolocation, status, at in [
        (acme, "us", 200, NOW),
        (acme, "emea", 401, NOW),
        (None, "us", 200, NOW + 1),
        (None, "emea", 503, NOW + 1),
    ]:
        ledger.record(
            at=at,
            connection=1,
            method="POST",
            path="/p",
            user_id="u",
            template_id="t",
            body=b"",
            status=status,
            fault=None,
            correlation_id="c",
            authorized=status != 401,
            token="x",
            company=company,
            geolocation=geolocation,
        )
    assert ledger.stats(acme)["byStatus"] == {"200": 1, "401": 1}
    assert ledger.stats("default")["byStatus"] == {"200": 1, "503": 1}
    assert ledger.stats(None, "us")["perSecond"] == {str(int(NOW)): 1, str(int(NOW) + 1): 1}
    assert ledger.stats(acme, "emea")["delivered"] == 0
    assert [r.seq for r in ledger.requests(None, None, "default", "emea")] == [4]
    assert ledger.by_company() == {acme: (2, 1), None: (2, 1)}
    assert ledger.stats()["total"] == 4


def test_a_geolocation_outage_answers_first_and_leaves_the_users_script_unused() -> None:
    key, script = parse_script({"match": {"userId": "u"}, "responses": [{"status": 429}]})
    scripts = {key: script}
    outage = parse_geo_script({"answer": {"status": 503}, "delayMs": 100})
    assert pick_at(scripts, outage, "u", "t") == Plan(status=503)
    assert len(script.pending) == 1
    slow_only = parse_geo_script({"delayMs": 100})
    assert pick_at(scripts, slow_only, "u", "t") == Plan(status=429)
    with pytest.raises(ValueError, match="delayMs"):
        parse_geo_script({"delayMs": -1})
