"""The company registry (issue 21 item 1) through its front doors: the real ``notify`` command and
the real ``notify api`` process, on the real Redis, against a sandbox whose token endpoint plays
Concur's (the password grant with ``credtype=authtoken`` and the rotating refresh grant).

Each test connects a company of its own (a fresh UUID and request token), so the shared Redis
needs no flushing; the sandbox is this module's own, so scripting its token endpoint disturbs
no other test.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from cryptography.fernet import Fernet
from prometheus_client.parser import text_string_to_metric_families

from sandbox.concur import Sandbox
from tests.harness import NotifyApi
from worker.concur.companies import default_company
from worker.front.stats import collect, render_prometheus
from worker.runtime import Runtime
from worker.settings import load_settings
from worker.store import keys
from worker.store.companies import CompanyRegistry
from worker.store.sealing import Cipher

ROOT = Path(__file__).resolve().parents[2]
NOTIFY = str(Path(sys.executable).parent / "notify")
CLIENT_SECRET = "sandbox-client-secret"  # the sandbox's default
FERNET_KEY = Fernet.generate_key().decode()
OPERATOR_KEY = "operator-key-for-companies-0001"
PARTNER_KEY = "partner-key-for-companies-0001"
CSRF = re.compile(r'name="csrf" value="([^"]+)"')


@pytest.fixture(scope="module")
def concur() -> Iterator[Sandbox]:
    """A sandbox of this module's own; its token endpoint plays Concur's."""
    with Sandbox(tokens=[f"static-{uuid.uuid4().hex}"]) as sandbox:
        yield sandbox


@dataclass
class Case:
    """One test's company: its UUID and request token, known to the sandbox's token endpoint."""

    sandbox: Sandbox
    company_id: str
    request_token: str
    client_id: str

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of a ``notify`` process with the app's OAuth client (and no company
        of its own: the session's NOTIFY_API_TOKEN stays the default company)."""
        env = {
            **os.environ,
            "NOTIFY_OAUTH_CLIENT_ID": self.client_id,
            "NOTIFY_OAUTH_CLIENT_SECRET": CLIENT_SECRET,
            "NOTIFY_OAUTH_TOKEN_URL": f"{self.sandbox.root_url}/oauth2/v0/token",
            "NOTIFY_TOKEN_ENCRYPTION_KEY": FERNET_KEY,
            "NOTIFY_OPERATOR_KEYS": OPERATOR_KEY,
            "NOTIFY_GATEWAY_KEYS": PARTNER_KEY,
            "NOTIFY_LOG_FORMAT": "text",
            **extra,
        }
        for name in ("NOTIFY_OAUTH_COMPANY_ID", "NOTIFY_OAUTH_COMPANY_AUTH_TOKEN"):
            env.pop(name, None)
        return env


@pytest.fixture
def case(concur: Sandbox) -> Case:
    concur.configure_oauth(reset=True)
    company_id = str(uuid.uuid4())
    request_token = f"request-{uuid.uuid4().hex}"
    concur.configure_oauth(company_id=company_id, auth_token=request_token)
    return Case(concur, company_id, request_token, f"app-{uuid.uuid4().hex[:8]}")


@pytest.fixture
def registry(runtime: Runtime) -> CompanyRegistry:
    """The registry on the session's Redis, opening with this module's key."""
    return CompanyRegistry(runtime.redis, Cipher(FERNET_KEY))


def notify(
    *args: str, env: dict[str, str], stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [NOTIFY, *args],
        cwd=ROOT,
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _connect(case: Case, token: str | None = None) -> subprocess.CompletedProcess[str]:
    return notify(
        "companies",
        "connect",
        case.company_id,
        "--request-token",
        "-",
        "--json",
        env=case.env(),
        stdin=(token or case.request_token) + "\n",
    )


def _raw(runtime: Runtime, company_id: str) -> dict[str, str]:
    fields: dict[str, str] = runtime.redis.hgetall(keys.company(company_id))
    return fields


# -- the command ---------------------------------------------------------------------------------


def test_connect_with_a_request_token_stores_the_company_with_its_refresh_token_sealed(
    case, registry, runtime
):
    result = _connect(case)
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["id"] == case.company_id
    assert shown["state"] == "connected"
    assert shown["geolocation"] == case.sandbox.root_url  # Concur's answer names it
    assert shown["connectedAt"] and shown["refreshedAt"] and shown["refreshExpiresAt"]
    assert case.sandbox.oauth_stats()["grants"] == {"password": 1}
    # The refresh token Concur issued is stored, sealed: never in clear text at rest.
    issued_refresh = case.sandbox.issued_tokens()[-1]
    raw = _raw(runtime, case.company_id)
    assert raw["refresh"].startswith("f1:")
    assert all(issued_refresh not in value for value in raw.values())
    assert all(case.request_token not in value for value in raw.values())
    assert registry.refresh_token(case.company_id) == issued_refresh
    assert case.company_id in runtime.redis.smembers(keys.COMPANIES)
    # The grant's access token is shared with the workers as their own fetch would be: sealed,
    # expiring from Redis when it is due for renewal, posted to the company's geolocation.
    sealed = runtime.redis.get(keys.company_access(case.company_id))
    assert sealed.startswith("f1:")
    assert all(token not in sealed for token in case.sandbox.issued_tokens())
    assert 0 < runtime.redis.pttl(keys.company_access(case.company_id)) <= 3600 * 1000
    access = registry.shared_access([case.company_id], int(time.time() * 1000))[case.company_id]
    assert access.token in case.sandbox.issued_tokens() and access.token != issued_refresh
    assert access.geolocation == shown["geolocation"]
    for text in (result.stdout, result.stderr):
        assert case.request_token not in text and issued_refresh not in text
        assert access.token not in text


def test_connect_with_a_refresh_token_stores_the_rotated_one(case, registry, runtime):
    given = case.sandbox.issue_refresh_token(case.client_id)
    result = notify(
        "companies",
        "connect",
        case.company_id,
        "--refresh-token",
        given,
        env=case.env(),
    )
    assert result.returncode == 0, result.stderr
    assert "connected" in result.stdout and case.company_id in result.stdout
    assert case.sandbox.oauth_stats()["grants"] == {"refresh_token": 1}
    stored = registry.refresh_token(case.company_id)
    assert stored is not None and stored != given  # Concur rotated it; the new one is kept
    # The stored token is the live one: Concur takes it, and the one given is retired.
    again = notify(
        "companies", "connect", case.company_id, "--refresh-token", stored, env=case.env()
    )
    assert again.returncode == 0, again.stderr
    retired = notify(
        "companies", "connect", case.company_id, "--refresh-token", given, env=case.env()
    )
    assert retired.returncode == 1
    assert "Concur refused the refresh token" in retired.stderr and "code=108" in retired.stderr


def test_concur_refusing_the_request_token_stores_nothing_and_exits_1(case, registry, runtime):
    wrong = f"request-{uuid.uuid4().hex}"
    result = _connect(case, wrong)
    assert result.returncode == 1
    assert result.stderr.startswith("error: not connected: Concur refused the request token")
    assert "invalid_grant" in result.stderr
    assert wrong not in result.stderr + result.stdout
    assert registry.get(case.company_id) is None
    assert case.company_id not in runtime.redis.smembers(keys.COMPANIES)


def test_a_refused_reconnection_keeps_what_the_company_had(case, registry, runtime):
    assert _connect(case).returncode == 0
    before = _raw(runtime, case.company_id)
    shared = runtime.redis.get(keys.company_access(case.company_id))
    assert _connect(case, f"request-{uuid.uuid4().hex}").returncode == 1
    assert _raw(runtime, case.company_id) == before
    assert runtime.redis.get(keys.company_access(case.company_id)) == shared


def test_a_reconnection_shares_its_own_access_token_in_place_of_the_last(case, registry, runtime):
    assert _connect(case).returncode == 0
    now_ms = int(time.time() * 1000)
    first = registry.shared_access([case.company_id], now_ms)[case.company_id].token
    assert _connect(case).returncode == 0
    second = registry.shared_access([case.company_id], now_ms)[case.company_id].token
    assert second != first and second in case.sandbox.issued_tokens()


def test_list_show_and_disconnect(case, registry, runtime):
    assert _connect(case).returncode == 0
    listed = notify("companies", "list", "--json", env=case.env())
    assert listed.returncode == 0, listed.stderr
    companies = json.loads(listed.stdout)["companies"]
    assert companies[0]["id"] == "default" and companies[0]["fromSettings"] is True
    assert companies[0]["reason"] == "from the settings (NOTIFY_API_TOKEN)"
    ours = [each for each in companies if each["id"] == case.company_id]
    assert ours and ours[0]["state"] == "connected" and ours[0]["fromSettings"] is False

    table = notify("companies", "list", env={**case.env(), "COLUMNS": "200"})
    assert table.returncode == 0, table.stderr
    header, first, *rows = table.stdout.splitlines()
    assert header.split()[:3] == ["ID", "STATE", "GEOLOCATION"]
    assert first.startswith("default (settings)")
    [row] = [line for line in rows if line.startswith(case.company_id)]
    assert row.split()[1:3] == ["connected", case.sandbox.root_url.partition("://")[2]]

    shown = notify("companies", "show", case.company_id, env=case.env())
    assert shown.returncode == 0, shown.stderr
    assert "connected with a request token" in shown.stdout
    assert "last refreshed" in shown.stdout

    gone = notify("companies", "disconnect", case.company_id, env=case.env())
    assert gone.returncode == 0, gone.stderr
    assert gone.stdout.strip() == f"disconnected {case.company_id}"
    after = json.loads(
        notify("companies", "show", case.company_id, "--json", env=case.env()).stdout
    )
    assert after["state"] == "disconnected" and after["reason"] == "disconnected by an operator"
    assert "refresh" not in _raw(runtime, case.company_id)  # the sealed token is deleted
    assert registry.refresh_token(case.company_id) is None


@pytest.mark.parametrize(
    ("args", "code", "text"),
    [
        (["companies", "show", "ACME"], 1, "not a company id"),
        (["companies", "show", str(uuid.UUID(int=1))], 4, "no company"),
        (["companies", "disconnect", str(uuid.UUID(int=2))], 4, "no company"),
        (["companies", "connect", str(uuid.UUID(int=3))], 1, "exactly one"),
        (
            [
                "companies",
                "connect",
                "0F3C2F6E-4A1B-4C2D-9E8F-7A6B5C4D3E2F",
                "--request-token",
                "t",
            ],
            1,
            "lower case",
        ),
    ],
)
def test_bad_company_commands_name_the_problem(case, args, code, text):
    result = notify(*args, env=case.env())
    assert result.returncode == code, result.stderr
    assert text in result.stderr


def test_connecting_without_the_apps_oauth_client_is_a_settings_error(case):
    env = case.env()
    for name in ("NOTIFY_OAUTH_CLIENT_ID", "NOTIFY_OAUTH_CLIENT_SECRET", "NOTIFY_OAUTH_TOKEN_URL"):
        env.pop(name)
    result = notify("companies", "connect", case.company_id, "--request-token", "t", env=env)
    assert result.returncode == 2
    assert "NOTIFY_OAUTH_CLIENT_ID" in result.stderr


def test_client_credentials_alone_leave_the_default_company_to_the_static_token(case):
    settings = load_settings(
        oauth_client_id=case.client_id,
        oauth_client_secret=CLIENT_SECRET,
        token_encryption_key=FERNET_KEY,
        oauth_company_id=None,
        oauth_company_auth_token=None,
        oauth_refresh_token=None,
        api_token="static-default-company-token",
    )
    runtime = Runtime.from_settings(settings)
    try:
        assert runtime.tokens.token() == "static-default-company-token"
    finally:
        runtime.close()
    assert case.sandbox.oauth_stats()["grants"] == {}  # no grant for a company it does not have


def test_an_oauth_default_company_shows_the_geolocation_its_tokens_follow(case, runtime):
    settings = load_settings(
        oauth_client_id=case.client_id,
        oauth_client_secret=CLIENT_SECRET,
        oauth_token_url=f"{case.sandbox.root_url}/oauth2/v0/token",
        token_encryption_key=FERNET_KEY,
        oauth_company_id=case.company_id,
        oauth_company_auth_token=case.request_token,
        oauth_refresh_token=None,
    )
    state = keys.oauth_state(case.client_id)
    runtime.redis.hset(state, mapping={"geolocation": case.sandbox.root_url, "updated": 5_000})
    shown = default_company(settings, runtime.redis)
    assert (shown.id, shown.state, shown.from_settings) == ("default", "connected", True)
    assert (shown.geolocation, shown.refreshed_ms) == (case.sandbox.root_url, 5_000)
    assert shown.reason == "from the settings (NOTIFY_OAUTH_*)"
    # A stored geolocation the tokens would not follow is not shown as theirs either.
    runtime.redis.hset(state, "geolocation", "https://evil.example")
    assert default_company(settings, runtime.redis).geolocation == case.sandbox.root_url


# -- the registry's own rules ----------------------------------------------------------------------


def test_a_late_rotation_never_revives_a_disconnected_company(registry):
    company_id = str(uuid.uuid4())
    registry.connected(company_id, "refresh-one-0000000", None, "https://us2.x", 1_000)
    assert registry.refreshed(company_id, "refresh-two-0000000", 5_000, "https://us2.x", 2_000)
    assert registry.refresh_token(company_id) == "refresh-two-0000000"
    assert registry.needs_reconnect(company_id, "Concur code 108", 3_000)
    assert not registry.refreshed(company_id, "refresh-three-00000", None, "https://us2.x", 4_000)
    needing = registry.get(company_id)
    assert needing is not None and needing.state == "needs_reconnect"
    assert needing.reason == "Concur code 108" and needing.state_ms == 3_000
    gone = registry.disconnect(company_id, 5_000)
    assert gone is not None and gone.state == "disconnected"
    assert not registry.refreshed(company_id, "refresh-four-000000", None, "https://us2.x", 6_000)
    assert not registry.needs_reconnect(company_id, "late", 7_000)
    assert registry.refresh_token(company_id) is None
    assert registry.get(company_id).state == "disconnected"  # type: ignore[union-attr]
    assert registry.disconnect(str(uuid.uuid4()), 8_000) is None


def test_a_token_sealed_under_a_retired_key_is_sealed_again_when_read(runtime):
    old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    company_id = str(uuid.uuid4())
    CompanyRegistry(runtime.redis, Cipher(old)).connected(
        company_id, "refresh-under-old-key", None, "https://us2.x", 1_000
    )
    rotating = CompanyRegistry(runtime.redis, Cipher(f"{new},{old}"))
    assert rotating.refresh_token(company_id) == "refresh-under-old-key"
    stored = _raw(runtime, company_id)["refresh"]
    assert Cipher(new).open(stored) == "refresh-under-old-key"


def test_the_one_round_trip_reads_say_what_get_and_refresh_token_say(runtime):
    old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    company_id, unknown = str(uuid.uuid4()), str(uuid.uuid4())
    CompanyRegistry(runtime.redis, Cipher(old)).connected(
        company_id, "refresh-under-old-key", 9_000, "https://us2.x", 1_000
    )
    rotating = CompanyRegistry(runtime.redis, Cipher(f"{new},{old}"))
    assert rotating.needs_reconnect(company_id, "Concur code 108", 3_000)
    company = rotating.get(company_id)
    assert company is not None and company.refresh_expires_ms == 9_000
    assert rotating.get_many([company_id, unknown, "not-a-company"]) == {
        company_id: company,
        unknown: None,
        "not-a-company": None,
    }
    assert rotating.with_refresh_token(company_id) == (company, "refresh-under-old-key")
    # Sealed again under the current key, as refresh_token does.
    assert Cipher(new).open(_raw(runtime, company_id)["refresh"]) == "refresh-under-old-key"
    assert rotating.with_refresh_token(unknown) == (None, None)
    rotating.disconnect(company_id, 4_000)
    assert rotating.with_refresh_token(company_id) == (rotating.get(company_id), None)


# -- the metric ----------------------------------------------------------------------------------


def _company_gauges(text: str) -> dict[str, float]:
    for family in text_string_to_metric_families(text):
        if family.name == "notify_companies":
            return {sample.labels["state"]: sample.value for sample in family.samples}
    raise AssertionError("no notify_companies metric")


def test_the_metric_counts_companies_by_state(registry, runtime):
    before = collect(runtime).companies
    ids = [str(uuid.uuid4()) for _ in range(4)]
    for company_id in ids:
        registry.connected(company_id, f"refresh-{company_id}", None, "https://us2.x", 1_000)
    registry.needs_reconnect(ids[0], "Concur code 108", 2_000)
    registry.disconnect(ids[1], 2_000)
    registry.disconnect(ids[2], 2_000)
    after = collect(runtime).companies
    delta = {state: after[state] - before[state] for state in after}
    assert delta == {"connected": 1, "needs_reconnect": 1, "disconnected": 2}
    gauges = _company_gauges(render_prometheus(collect(runtime)))
    assert set(gauges) == {"connected", "needs_reconnect", "disconnected"}  # bounded labels
    assert gauges == {state: float(count) for state, count in collect(runtime).companies.items()}


# -- the HTTP service ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def service(concur: Sandbox, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real ``notify api`` process with the app's OAuth client and this module's sandbox."""
    holder = Case(concur, "", "", f"app-{uuid.uuid4().hex[:8]}")
    api = NotifyApi(tmp_path_factory.mktemp("api") / "api.log", holder.env())
    yield api.url
    api.stop()
    logged = api.log()
    assert "request-" not in logged  # no request token reached a log line


OPERATOR = {"Authorization": f"Bearer {OPERATOR_KEY}"}
PARTNER = {"Authorization": f"Bearer {PARTNER_KEY}"}


def test_the_api_connects_lists_shows_and_disconnects(service, case, registry, runtime):
    path = f"{service}/companies/{case.company_id}"
    connected = httpx.put(path, json={"requestToken": case.request_token}, headers=OPERATOR)
    assert connected.status_code == 200, connected.text
    body = connected.json()
    assert (body["id"], body["state"], body["fromSettings"]) == (
        case.company_id,
        "connected",
        False,
    )
    assert registry.refresh_token(case.company_id) == case.sandbox.issued_tokens()[-1]

    listed = httpx.get(f"{service}/companies", headers=OPERATOR).json()["companies"]
    assert listed[0]["id"] == "default"
    assert case.company_id in [each["id"] for each in listed]
    assert httpx.get(path, headers=OPERATOR).json()["state"] == "connected"
    assert httpx.get(f"{service}/companies/default", headers=OPERATOR).json()["fromSettings"]

    gone = httpx.delete(path, headers=OPERATOR)
    assert gone.status_code == 200 and gone.json()["state"] == "disconnected"
    assert httpx.delete(path, headers=OPERATOR).status_code == 200  # the same again
    assert "refresh" not in _raw(runtime, case.company_id)
    unknown = f"{service}/companies/{uuid.uuid4()}"
    assert httpx.get(unknown, headers=OPERATOR).status_code == 404
    assert httpx.delete(unknown, headers=OPERATOR).status_code == 404


def test_the_api_answers_502_when_concur_refuses_or_fails_and_stores_nothing(
    service, case, registry
):
    path = f"{service}/companies/{case.company_id}"
    refused = httpx.put(path, json={"requestToken": "request-wrong"}, headers=OPERATOR)
    assert refused.status_code == 502
    [error] = refused.json()["errors"]
    assert error["errorCode"] == "CONCUR_REFUSED"
    assert "Concur refused the request token" in error["errorMessage"]
    assert "request-wrong" not in refused.text
    case.sandbox.configure_oauth(failures=[503])
    down = httpx.put(path, json={"requestToken": case.request_token}, headers=OPERATOR)
    assert down.status_code == 502
    assert down.json()["errors"][0]["errorCode"] == "CONCUR_UNAVAILABLE"
    assert registry.get(case.company_id) is None


@pytest.mark.parametrize(
    ("body", "headers", "status", "code"),
    [
        ({"requestToken": "a", "refreshToken": "b"}, OPERATOR, 400, "INVALID_BODY"),
        ({}, OPERATOR, 400, "INVALID_BODY"),
        ({"requestToken": ""}, OPERATOR, 400, "INVALID_BODY"),
        ({"requestToken": "a", "extra": 1}, OPERATOR, 400, "INVALID_BODY"),
        ({"requestToken": 5}, OPERATOR, 400, "INVALID_BODY"),
        ({"requestToken": "a"}, PARTNER, 403, "FORBIDDEN"),
        ({"requestToken": "a"}, {}, 401, "UNAUTHORIZED"),
    ],
)
def test_the_api_refuses_a_bad_connection_request(
    service, case, registry, body, headers, status, code
):
    answer = httpx.put(f"{service}/companies/{case.company_id}", json=body, headers=headers)
    assert answer.status_code == status, answer.text
    assert answer.json()["errors"][0]["errorCode"] == code
    assert registry.get(case.company_id) is None
    assert case.sandbox.oauth_stats()["grants"] == {}  # Concur was never asked


@pytest.mark.parametrize(
    ("method", "company", "status"),
    [
        ("GET", "ACME", 400),
        ("GET", "0F3C2F6E-4A1B-4C2D-9E8F-7A6B5C4D3E2F", 400),
        ("PUT", "default", 400),
        ("DELETE", "default", 400),
    ],
)
def test_the_api_refuses_a_company_id_that_is_not_one(service, method, company, status):
    body = {"requestToken": "a"} if method == "PUT" else None
    answer = httpx.request(method, f"{service}/companies/{company}", json=body, headers=OPERATOR)
    assert answer.status_code == status, answer.text


def test_metrics_and_the_console_show_the_companies(service, case):
    connected = httpx.put(
        f"{service}/companies/{case.company_id}",
        json={"requestToken": case.request_token},
        headers=OPERATOR,
    )
    assert connected.status_code == 200
    gauges = _company_gauges(httpx.get(f"{service}/metrics").text)
    assert gauges["connected"] >= 1
    with httpx.Client(base_url=service, follow_redirects=True) as browser:
        anonymous = browser.get("/console/companies")
        assert anonymous.url.path == "/console/login"  # a page behind the operator's login
        token = CSRF.search(anonymous.text)
        assert token is not None
        browser.post(
            "/console/login",
            data={"csrf": token.group(1), "key": OPERATOR_KEY, "next": "/console/companies"},
        )
        page = browser.get("/console/companies")
    assert page.status_code == 200
    assert case.company_id in page.text
    assert '<span class="badge connected">connected</span>' in page.text
    assert "(from the settings)" in page.text
