"""The sandbox speaks many companies (issue 21, item 6): companies with tokens of their own, at
geolocations that each listen on a port of their own; all over real loopback HTTP (httpx)."""

from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from sandbox.concur import Sandbox

CLIENT_ID = "partner-app"
CLIENT_SECRET = "sandbox-client-secret"  # the token endpoint's default app secret
STATIC_TOKEN = "sandbox-token"
BODY = {"sessionId": "s-1", "templateId": "welcome", "context": {"url": "https://a.example/x"}}


@pytest.fixture
def sandbox() -> Iterator[Sandbox]:
    """A sandbox of its own at two geolocations, ``us`` (the primary) and ``emea``."""
    with Sandbox(geolocations=["us", "emea"]) as sb:
        yield sb


@pytest.fixture
def control(sandbox: Sandbox) -> Iterator[httpx.Client]:
    """The control plane, over HTTP."""
    with httpx.Client(base_url=sandbox.root_url + "/_sandbox", timeout=30) as client:
        yield client


def company_id() -> str:
    return str(uuid.uuid4())


def create(control: httpx.Client, company: str, geolocation: str, request_token: str) -> None:
    doc = {"id": company, "geolocation": geolocation, "requestToken": request_token}
    answer = control.post("/companies", json=doc)
    assert answer.status_code == 201, answer.text
    assert answer.json() == {"created": 1}


def password_grant(root: str, company: str, request_token: str) -> httpx.Response:
    form = {
        "grant_type": "password",
        "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET,
        "username": company,
        "password": request_token,
        "credtype": "authtoken",
    }
    return httpx.post(f"{root}/oauth2/v0/token", data=form)


def refresh_grant(root: str, refresh_token: str) -> httpx.Response:
    form = {
        "grant_type": "refresh_token",
        "client_id": CLIENT_ID,
        "client_secret": CLIENT_SECRET,
        "refresh_token": refresh_token,
    }
    return httpx.post(f"{root}/oauth2/v0/token", data=form)


def connect(sandbox: Sandbox, company: str, geolocation: str, request_token: str) -> dict[str, Any]:
    """The company's first tokens, asked of its own geolocation."""
    answer = password_grant(sandbox.geolocation_url(geolocation), company, request_token)
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


def post(root: str, base_path: str, token: str, user_id: str = "u-1") -> httpx.Response:
    return httpx.post(
        f"{root}{base_path}/messages/{user_id}/session",
        json=BODY,
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
    )


def test_two_companies_at_two_geolocations_get_their_own_tokens_and_posts_land_at_home(
    sandbox: Sandbox, control: httpx.Client
) -> None:
    acme, globex = company_id(), company_id()
    create(control, acme, "us", "rq-acme")
    create(control, globex, "emea", "rq-globex")
    us, emea = sandbox.geolocation_url("us"), sandbox.geolocation_url("emea")
    assert us == sandbox.root_url and emea != us

    acme_tokens = connect(sandbox, acme, "us", "rq-acme")
    globex_tokens = connect(sandbox, globex, "emea", "rq-globex")
    assert (acme_tokens["geolocation"], globex_tokens["geolocation"]) == (us, emea)
    assert acme_tokens["access_token"] != globex_tokens["access_token"]

    assert post(us, sandbox.base_path, acme_tokens["access_token"], "u-acme").status_code == 200
    assert post(emea, sandbox.base_path, globex_tokens["access_token"], "u-gx").status_code == 200
    # A company's token is good at its own geolocation only.
    elsewhere = post(us, sandbox.base_path, globex_tokens["access_token"], "u-gx")
    assert elsewhere.status_code == 401
    assert "geolocation" in elsewhere.json()["errors"][0]["errorMessage"]

    records = control.get("/requests").json()["requests"]
    assert [(r["userId"], r["company"], r["geolocation"], r["status"]) for r in records] == [
        ("u-acme", acme, "us", 200),
        ("u-gx", globex, "emea", 200),
        ("u-gx", globex, "us", 401),
    ]
    only_globex = control.get("/requests", params={"company": globex, "geolocation": "emea"})
    assert [r["seq"] for r in only_globex.json()["requests"]] == [2]
    globex_stats = control.get("/stats", params={"company": globex}).json()
    assert (globex_stats["total"], globex_stats["delivered"]) == (2, 1)
    assert globex_stats["byStatus"] == {"200": 1, "401": 1}
    assert globex_stats["tokenRequests"] == 1
    at_emea = control.get("/stats", params={"geolocation": "emea"}).json()
    assert (at_emea["total"], at_emea["delivered"]) == (1, 1)
    assert sandbox.stats(company=acme, geolocation="us")["delivered"] == 1
    assert sandbox.stats()["total"] == 3  # the unfiltered figures count everything, as before


def test_a_token_request_at_another_geolocation_is_answered_code_16_naming_the_companys(
    sandbox: Sandbox, control: httpx.Client
) -> None:
    globex = company_id()
    create(control, globex, "emea", "rq-globex")
    answer = password_grant(sandbox.geolocation_url("us"), globex, "rq-globex")
    assert answer.status_code == 400
    assert answer.json()["code"] == 16
    assert answer.json()["geolocation"] == sandbox.geolocation_url("emea")
    assert "access_token" not in answer.json()
    # Nothing was issued there; a wrong request token is refused, not redirected.
    assert control.get(f"/companies/{globex}").json()["liveAccessTokens"] == 0
    wrong = password_grant(sandbox.geolocation_url("us"), globex, "not-the-token")
    assert (wrong.status_code, wrong.json().get("code")) == (400, None)
    assert connect(sandbox, globex, "emea", "rq-globex")["access_token"]


def test_a_revoked_companys_refresh_fails_with_108_while_the_others_still_works(
    sandbox: Sandbox, control: httpx.Client
) -> None:
    acme, globex = company_id(), company_id()
    create(control, acme, "us", "rq-acme")
    create(control, globex, "us", "rq-globex")
    acme_tokens = connect(sandbox, acme, "us", "rq-acme")
    globex_tokens = connect(sandbox, globex, "us", "rq-globex")

    revoked = control.post(f"/companies/{acme}", json={"revokeRefreshTokens": True})
    assert revoked.status_code == 200 and revoked.json()["liveRefreshTokens"] == 0

    refused = refresh_grant(sandbox.root_url, acme_tokens["refresh_token"])
    assert refused.status_code == 400
    assert refused.json()["code"] == 108
    renewed = refresh_grant(sandbox.root_url, globex_tokens["refresh_token"])
    assert renewed.status_code == 200
    assert renewed.json()["refresh_token"] != globex_tokens["refresh_token"]
    # Refresh tokens only: acme's access token still posts until it is revoked too.
    assert post(sandbox.root_url, sandbox.base_path, acme_tokens["access_token"]).status_code == 200
    control.post(f"/companies/{acme}", json={"revokeAccessTokens": True})
    assert post(sandbox.root_url, sandbox.base_path, acme_tokens["access_token"]).status_code == 401
    assert post(
        sandbox.root_url, sandbox.base_path, renewed.json()["access_token"]
    ).status_code == (200)
    # Reconnecting with the request token (the App Center's flow) works again.
    assert connect(sandbox, acme, "us", "rq-acme")["refresh_token"]
    assert control.get(f"/companies/{acme}").json()["codes"] == {"108": 1}


def test_a_geolocation_scripted_503_answers_503_only_there(
    sandbox: Sandbox, control: httpx.Client
) -> None:
    acme, globex = company_id(), company_id()
    create(control, acme, "us", "rq-acme")
    create(control, globex, "emea", "rq-globex")
    acme_token = connect(sandbox, acme, "us", "rq-acme")["access_token"]
    globex_token = connect(sandbox, globex, "emea", "rq-globex")["access_token"]
    us, emea = sandbox.geolocation_url("us"), sandbox.geolocation_url("emea")
    sandbox.script([{"status": 429}], user_id="u-gx")  # the user's own script, kept for later

    outage = {"answer": {"status": 503, "retryAfter": "300"}}
    assert control.post("/geolocations/emea", json=outage).json()["answer"] == 503
    for _ in range(3):
        answer = post(emea, sandbox.base_path, globex_token, "u-gx")
        assert answer.status_code == 503
        assert answer.headers["retry-after"] == "300"
    assert post(us, sandbox.base_path, acme_token, "u-acme").status_code == 200
    assert control.get("/stats", params={"geolocation": "us"}).json()["byStatus"] == {"200": 1}

    # Over: the user's script was not used up by the outage.
    control.post("/geolocations/emea", json={})
    assert post(emea, sandbox.base_path, globex_token, "u-gx").status_code == 429
    assert post(emea, sandbox.base_path, globex_token, "u-gx").status_code == 200


def test_a_slow_geolocation_delays_every_answer_there_only(
    sandbox: Sandbox, control: httpx.Client
) -> None:
    sandbox.script_geolocation("emea", delay_ms=1500)
    started = time.monotonic()
    assert post(sandbox.geolocation_url("emea"), sandbox.base_path, STATIC_TOKEN).status_code == 200
    assert time.monotonic() - started >= 1.5
    started = time.monotonic()
    assert post(sandbox.geolocation_url("us"), sandbox.base_path, STATIC_TOKEN).status_code == 200
    assert time.monotonic() - started < 1.5
    assert control.get("/geolocations/emea").json()["delayMs"] == 1500
    sandbox.reset()  # clears the geolocations' scripts with the others
    assert control.get("/geolocations/emea").json()["delayMs"] == 0


def test_a_thousand_companies_are_created_in_one_call_and_each_gets_its_own_token(
    sandbox: Sandbox, control: httpx.Client
) -> None:
    companies = [
        {"id": company_id(), "geolocation": ("us", "emea")[n % 2], "requestToken": f"rq-{n}"}
        for n in range(1000)
    ]
    answer = control.post("/companies", json={"companies": companies})
    assert (answer.status_code, answer.json()) == (201, {"created": 1000})
    listing = control.get("/companies").json()
    assert listing["count"] == 1000
    assert listing["tokenRequestsPerCompany"] == {"0": 1000}

    roots = sandbox.geolocations()
    tokens = set()
    with httpx.Client(timeout=30) as client:
        for company in companies:
            form = {
                "grant_type": "password",
                "client_id": CLIENT_ID,
                "client_secret": CLIENT_SECRET,
                "username": company["id"],
                "password": company["requestToken"],
                "credtype": "authtoken",
            }
            root = roots[company["geolocation"]]
            granted = client.post(f"{root}/oauth2/v0/token", data=form)
            assert granted.status_code == 200
            tokens.add(granted.json()["access_token"])
            posted = client.post(
                f"{root}{sandbox.base_path}/messages/u-1/session",
                json=BODY,
                headers={"Authorization": f"Bearer {granted.json()['access_token']}"},
            )
            assert posted.status_code == 200
    assert len(tokens) == 1000
    listing = control.get("/companies").json()
    assert listing["tokenRequestsPerCompany"] == {"1": 1000}
    assert {c["posts"] for c in listing["companies"]} == {1}
    assert {r["company"] for r in sandbox.requests()} == {c["id"] for c in companies}


def test_a_bulk_creation_with_one_bad_company_creates_none(control: httpx.Client) -> None:
    good = {"id": company_id(), "geolocation": "us", "requestToken": "rq"}
    for bad, complaint in [
        ({"id": "ACME", "geolocation": "us", "requestToken": "rq"}, "UUID"),
        ({"id": company_id().upper(), "geolocation": "us", "requestToken": "rq"}, "lowercase"),
        ({"id": company_id(), "geolocation": "apj", "requestToken": "rq"}, "geolocation"),
        ({"id": company_id(), "geolocation": "us"}, "requestToken"),
        ({"id": company_id(), "geolocation": "us", "requestToken": "rq", "x": 1}, "unknown"),
        (good, "twice"),
    ]:
        answer = control.post("/companies", json={"companies": [good, bad]})
        assert answer.status_code == 400
        assert complaint in answer.json()["errors"][0]["errorMessage"]
    assert control.get("/companies").json()["count"] == 0
    assert control.get(f"/companies/{good['id']}").status_code == 404
    assert control.post(f"/companies/{good['id']}", json={}).status_code == 404


def test_a_moved_company_is_sent_to_its_new_geolocation(
    sandbox: Sandbox, control: httpx.Client
) -> None:
    globex = company_id()
    create(control, globex, "emea", "rq-globex")
    tokens = connect(sandbox, globex, "emea", "rq-globex")
    control.post(f"/companies/{globex}", json={"geolocation": "us"})
    moved = refresh_grant(sandbox.geolocation_url("emea"), tokens["refresh_token"])
    assert (moved.status_code, moved.json()["code"]) == (400, 16)
    assert moved.json()["geolocation"] == sandbox.geolocation_url("us")
    renewed = refresh_grant(moved.json()["geolocation"], tokens["refresh_token"])
    assert renewed.status_code == 200  # the code-16 answer did not spend it
    assert renewed.json()["geolocation"] == sandbox.geolocation_url("us")


def test_the_default_company_works_as_before_next_to_the_companies(
    sandbox: Sandbox, control: httpx.Client
) -> None:
    acme = company_id()
    create(control, acme, "emea", "rq-acme")
    default = password_grant(sandbox.root_url, "sandbox-company", "sandbox-auth-token")
    assert default.status_code == 200
    assert default.json()["geolocation"] == sandbox.root_url
    for token in (STATIC_TOKEN, default.json()["access_token"]):
        # The default company is not bound to one geolocation: good at every one.
        for root in sandbox.geolocations().values():
            assert post(root, sandbox.base_path, token).status_code == 200
    assert {r["company"] for r in sandbox.requests()} == {None}
    assert control.get("/stats", params={"company": "default"}).json()["delivered"] == 4
    assert control.get("/stats", params={"company": acme}).json()["total"] == 0
    assert sandbox.oauth_stats()["grants"] == {"password": 1}


def test_a_geolocation_added_while_serving_answers_at_once(
    sandbox: Sandbox, control: httpx.Client
) -> None:
    added = control.post("/geolocations", json={"name": "apj"})
    assert added.status_code == 201
    root = added.json()["rootUrl"]
    assert root == sandbox.geolocation_url("apj")
    assert added.json()["url"] == root + sandbox.base_path
    assert control.post("/geolocations", json={"name": "apj"}).status_code == 200  # no second
    assert post(root, sandbox.base_path, STATIC_TOKEN).status_code == 200
    [record] = sandbox.requests(geolocation="apj")
    assert record["status"] == 200
    assert [g["name"] for g in control.get("/geolocations").json()["geolocations"]] == [
        "us",
        "emea",
        "apj",
    ]
    in_process = sandbox.add_geolocation("apac")["rootUrl"]  # the same from the test's thread
    assert post(in_process, sandbox.base_path, STATIC_TOKEN).status_code == 200
    assert sandbox.stats(geolocation="apac")["delivered"] == 1
    assert control.post("/geolocations", json={"name": "Bad Name"}).status_code == 400
    assert control.post("/geolocations/nowhere", json={}).status_code == 404


def test_no_company_secret_is_shown_by_the_control_plane(
    sandbox: Sandbox, control: httpx.Client
) -> None:
    acme = company_id()
    request_token, held = f"rq-{uuid.uuid4().hex}", f"rt-{uuid.uuid4().hex}"
    sandbox.create_company(acme, geolocation="us", request_token=request_token, refresh_token=held)
    tokens = refresh_grant(sandbox.root_url, held).json()  # the refresh token it held works
    post(sandbox.root_url, sandbox.base_path, tokens["access_token"])
    shown = " ".join(
        control.get(path).text
        for path in ("/companies", f"/companies/{acme}", "/requests", "/stats", "/oauth")
    )
    for secret in (request_token, held, tokens["access_token"], tokens["refresh_token"]):
        assert secret not in shown
    assert request_token not in repr(sandbox.companies())


def test_the_command_line_serves_each_geolocation_on_its_port() -> None:
    geolocations = ["--geolocation", "us", "--geolocation", "emea"]
    process = subprocess.Popen(
        [sys.executable, "-m", "sandbox.concur", "--port", "0", *geolocations],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        primary = process.stdout.readline().split()[-1]
        emea = process.stdout.readline().split()[-1]
        assert primary.endswith("/notifications/v4") and emea.endswith("/notifications/v4")
        assert post(emea.removesuffix("/notifications/v4"), "/notifications/v4", STATIC_TOKEN)
        stats = httpx.get(primary.removesuffix("/notifications/v4") + "/_sandbox/stats").json()
        assert stats["total"] == 1
    finally:
        process.terminate()
        process.wait(timeout=30)
