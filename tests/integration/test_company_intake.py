"""A message names its company (issue 21, C1), through every front door: a real ``notify api``
process, the real ``notify`` command and ``tasks.enqueue``, on the real Redis, with the sandbox
the session runs.

The registry's companies are written with the real ``CompanyRegistry`` (connecting them through
Concur's token endpoint is ``test_companies``'s subject). Delivery to a registry company is the
worker's part (issue 21, C2): these tests pin intake and the views; the default company's
delivery is pinned by tests/test_pipeline.py as before.
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

import tasks
from sandbox.concur import Sandbox
from tests.harness import NotifyApi, wait_for
from worker.front.stats import collect, render_prometheus
from worker.rules.validation import InvalidRequest
from worker.runtime import Runtime
from worker.shapes.models import DEFAULT_COMPANY, Message, message_id
from worker.store import keys
from worker.store.codec import AttemptRecord, Failure, now_ms
from worker.store.companies import CompanyRegistry
from worker.store.sealing import Cipher

ROOT = Path(__file__).resolve().parents[2]
NOTIFY = str(Path(sys.executable).parent / "notify")
ACME_KEY = "acme-key-" + uuid.uuid4().hex
GLOBEX_KEY = "globex-key-" + uuid.uuid4().hex
BETA_KEY = "beta-key-" + uuid.uuid4().hex
OPERATOR_KEY = "operator-key-" + uuid.uuid4().hex
ACME = {"Authorization": f"Bearer {ACME_KEY}"}
GLOBEX = {"Authorization": f"Bearer {GLOBEX_KEY}"}
BETA = {"Authorization": f"Bearer {BETA_KEY}"}
OPERATOR = {"Authorization": f"Bearer {OPERATOR_KEY}"}
HEADER = "Concur-Company-Id"
CSRF = re.compile(r'name="csrf" value="([^"]+)"')
API_LOG: dict[str, Path] = {}  # the service's log file, for the start-up warning's test


@dataclass(frozen=True)
class Companies:
    """This module's registry companies, one per state, and one connected but not acme's."""

    connected: str
    needs_reconnect: str
    disconnected: str
    ungranted: str


def _uuid() -> str:
    return str(uuid.uuid4())


def _cancel_unfinished(runtime: Runtime, ids: list[str]) -> None:
    """Cancel those of ``ids`` not finished (one in flight, once its attempt is over).

    Messages of a registry company left in the shared database would churn under every later
    test of the session: the session worker has no OAuth client, so it defers them without end
    (a log line each), loading it and moving the shared gauges (retrying, in flight) while
    other tests read them.
    """

    def settled(ident: str) -> bool:
        verdict, state = runtime.store.cancel(ident, partner=None)
        return verdict != "refused" or state in ("delivered", "failed")

    wait_for(lambda: all(settled(i) for i in ids), what=f"{len(ids)} messages cancelled")


@pytest.fixture(scope="module")
def companies(runtime: Runtime, sandbox: Sandbox) -> Iterator[Companies]:
    registry = CompanyRegistry(runtime.redis, Cipher(Fernet.generate_key().decode()))
    made = Companies(_uuid(), _uuid(), _uuid(), _uuid())
    now = int(time.time() * 1000)
    geo = sandbox.root_url  # whatever a worker does with them stays on this machine
    for company in (made.connected, made.needs_reconnect, made.disconnected, made.ungranted):
        registry.connected(company, f"refresh-{uuid.uuid4().hex}", None, geo, now)
    assert registry.needs_reconnect(made.needs_reconnect, "Concur refused the token", now)
    assert registry.disconnect(made.disconnected, now) is not None
    yield made
    # The module's tests queue messages for these companies through the gateway, the CLI and
    # the producer, published to the session worker's queue.
    ours = {made.connected, made.needs_reconnect, made.disconnected, made.ungranted}
    prefix = keys.message("")
    ids = [
        key.removeprefix(prefix)
        for key in runtime.redis.scan_iter(match=keys.message("*"), count=1000)
        if not key.endswith(":attempts") and runtime.redis.hget(key, "company") in ours
    ]
    _cancel_unfinished(runtime, ids)


@pytest.fixture(scope="module")
def service(companies: Companies, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real ``notify api``: acme may name two companies, globex any, beta none (and a grant
    to ``ghost``, a partner without a key)."""
    env = {
        "NOTIFY_GATEWAY_KEYS": f"acme:{ACME_KEY},globex:{GLOBEX_KEY},beta:{BETA_KEY}",
        "NOTIFY_OPERATOR_KEYS": OPERATOR_KEY,
        "NOTIFY_PARTNER_COMPANIES": (
            f"acme={companies.connected}|{companies.needs_reconnect},globex=*,ghost=*"
        ),
        "NOTIFY_LOG_FORMAT": "text",
    }
    API_LOG["path"] = tmp_path_factory.mktemp("api") / "api.log"
    api = NotifyApi(API_LOG["path"], env)
    yield api.url
    api.stop()


@pytest.fixture
def http(service: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=service, timeout=30) as client:
        yield client


REPORT_URL = "https://app.example.com/reports/1"


def _body(session: str | None = None) -> dict[str, object]:
    return {
        "sessionId": session or f"s-{uuid.uuid4().hex[:8]}",
        "templateId": "welcome",
        "context": {"url": REPORT_URL},
    }


def _post(
    http: httpx.Client, user: str, body: dict[str, object], key: dict[str, str], company: str
) -> httpx.Response:
    return http.post(f"/messages/{user}/session", json=body, headers={**key, HEADER: company})


def _recorded(runtime: Runtime, ident: str) -> bool:
    return bool(runtime.redis.exists(keys.message(ident)))


def _codes(response: httpx.Response) -> list[str]:
    return [error["errorCode"] for error in response.json()["errors"]]


def notify(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [NOTIFY, *args], cwd=ROOT, capture_output=True, text=True, timeout=60, env=dict(os.environ)
    )


# -- the gateway -----------------------------------------------------------------------------------


def test_a_partner_key_naming_a_company_not_granted_is_refused_403_and_nothing_is_queued(
    http, runtime, companies, user_id
):
    body = _body()
    for partner, key, company in (
        ("acme", ACME, companies.ungranted),  # acme is granted two others
        ("beta", BETA, companies.connected),  # beta is granted none
    ):
        refused = _post(http, user_id, body, key, company)
        assert refused.status_code == 403, refused.text
        assert _codes(refused) == ["COMPANY_NOT_GRANTED"]
        would_be = message_id(
            user_id, str(body["sessionId"]), "welcome", partner, company, url=REPORT_URL
        )
        assert not _recorded(runtime, would_be)
    # Without the header, beta still sends to the default company as before.
    plain = http.post(f"/messages/{user_id}/session", json=body, headers=BETA)
    assert plain.status_code == 202, plain.text
    assert plain.json()["id"] == message_id(
        user_id, str(body["sessionId"]), "welcome", "beta", url=REPORT_URL
    )


def test_an_unknown_company_is_refused_422_and_nothing_is_queued(http, runtime, user_id):
    body, stranger = _body(), _uuid()
    refused = _post(http, user_id, body, GLOBEX, stranger)
    assert refused.status_code == 422, refused.text
    assert _codes(refused) == ["UNKNOWN_COMPANY"]
    assert stranger in refused.json()["errors"][0]["errorMessage"]
    ident = message_id(
        user_id, str(body["sessionId"]), "welcome", "globex", stranger, url=REPORT_URL
    )
    assert not _recorded(runtime, ident)


def test_a_disconnected_company_is_refused_422_and_nothing_is_queued(
    http, runtime, companies, user_id
):
    body = _body()
    refused = _post(http, user_id, body, GLOBEX, companies.disconnected)
    assert refused.status_code == 422, refused.text
    assert _codes(refused) == ["COMPANY_DISCONNECTED"]
    ident = message_id(
        user_id, str(body["sessionId"]), "welcome", "globex", companies.disconnected, url=REPORT_URL
    )
    assert not _recorded(runtime, ident)


def test_granted_companies_are_queued_needs_reconnect_included_and_status_names_them(
    http, runtime, companies, user_id
):
    body = _body()
    ids = []
    for company in (companies.connected, companies.needs_reconnect):
        queued = _post(http, user_id, body, ACME, company)
        assert queued.status_code == 202, queued.text
        ident = queued.json()["id"]
        assert ident == message_id(
            user_id, str(body["sessionId"]), "welcome", "acme", company, url=REPORT_URL
        )
        status = http.get(f"/messages/{ident}", headers=ACME).json()
        assert status["company"] == company
        ids.append(ident)
    default = http.post(f"/messages/{user_id}/session", json=body, headers=ACME)
    assert default.status_code == 202
    assert http.get(f"/messages/{default.json()['id']}", headers=ACME).json()["company"] == (
        DEFAULT_COMPANY
    )
    assert len({*ids, default.json()["id"]}) == 3  # one request, three companies, three messages


def test_a_star_grant_names_any_company_of_the_registry(http, companies, user_id):
    for company in (companies.connected, companies.ungranted, companies.needs_reconnect):
        queued = _post(http, user_id, _body(), GLOBEX, company)
        assert queued.status_code == 202, queued.text


def test_notify_api_warns_about_a_grant_to_a_partner_without_a_key(service):
    logged = API_LOG["path"].read_text()
    assert "NOTIFY_PARTNER_COMPANIES grants partner 'ghost', which has no key" in logged
    assert "'acme'" not in logged and "'globex'" not in logged


@pytest.mark.parametrize("value", ["ACME", "", "0F3C2F6E-4A1B-4C2D-9E8F-7A6B5C4D3E2F"])
def test_a_header_that_names_no_company_is_a_400(http, user_id, value):
    refused = _post(http, user_id, _body(), GLOBEX, value)
    assert refused.status_code == 400, refused.text
    assert _codes(refused) == ["INVALID_HEADER"]


def test_the_header_given_twice_is_a_400(service, companies, user_id):
    headers = [
        ("Authorization", f"Bearer {GLOBEX_KEY}"),
        (HEADER, companies.connected),
        (HEADER, companies.ungranted),
    ]
    with httpx.Client(base_url=service, timeout=30) as client:
        refused = client.post(f"/messages/{user_id}/session", json=_body(), headers=headers)
    assert refused.status_code == 400
    assert _codes(refused) == ["INVALID_HEADER"]


# -- notify send and tasks.enqueue -----------------------------------------------------------------


def test_notify_send_takes_a_company_and_notify_status_shows_it(runtime, companies, user_id):
    sent = notify("send", user_id, "--session", "s-cli", "--template", "welcome", "--company",
                  companies.connected)  # fmt: skip
    assert sent.returncode == 0, sent.stderr
    ident = sent.stdout.strip()
    assert ident == message_id(user_id, "s-cli", "welcome", company=companies.connected)
    shown = notify("status", ident)
    assert shown.returncode == 0, shown.stderr
    assert re.search(rf"company +{companies.connected}", shown.stdout)
    as_json = json.loads(notify("status", ident, "--json").stdout)
    assert as_json["company"] == companies.connected


@pytest.mark.parametrize(
    ("which", "says"),
    [
        ("unknown", "is not in the registry"),
        ("disconnected", "is disconnected"),
        ("ACME", "company must be a company UUID in lower case"),
    ],
)
def test_notify_send_refuses_a_company_it_cannot_send_to(runtime, companies, user_id, which, says):
    company = {"unknown": _uuid(), "disconnected": companies.disconnected}.get(which, which)
    refused = notify("send", user_id, "--session", "s-1", "--template", "welcome", "--company",
                     company)  # fmt: skip
    assert refused.returncode == 1
    assert refused.stderr.startswith("error: invalid request: company: ")
    assert says in refused.stderr
    assert refused.stdout == ""


def test_enqueue_and_enqueue_many_take_a_company(runtime, companies, user_id):
    one = tasks.enqueue(user_id, "s-py", "welcome", company=companies.connected)
    assert one == message_id(user_id, "s-py", "welcome", company=companies.connected)
    assert runtime.store.lookup(one).company == companies.connected
    rows = [(user_id, f"s-{n}", "welcome", None) for n in range(50)]
    many = tasks.enqueue_many(rows, company=companies.needs_reconnect)
    assert many == [
        message_id(user_id, f"s-{n}", "welcome", company=companies.needs_reconnect)
        for n in range(50)
    ]
    assert {runtime.store.lookup(ident).company for ident in many} == {companies.needs_reconnect}


def test_enqueue_many_for_an_unknown_company_queues_none_of_them(runtime, user_id):
    stranger = _uuid()
    rows = [(user_id, f"s-{n}", "welcome", None) for n in range(30)]
    with pytest.raises(InvalidRequest) as refused:
        tasks.enqueue_many(rows, company=stranger)
    assert [problem.code for problem in refused.value.problems] == ["UNKNOWN_COMPANY"]
    ids = [message_id(user_id, f"s-{n}", "welcome", company=stranger) for n in range(30)]
    assert not any(_recorded(runtime, ident) for ident in ids)
    with pytest.raises(InvalidRequest):
        tasks.enqueue(user_id, "s-x", "welcome", company=stranger)


# -- the failed list by company, in the three doors ------------------------------------------------


def _dead(runtime: Runtime, user: str, company: str | None) -> str:
    """A message for ``company`` recorded through intake, then dead-lettered by the real store."""
    ident = tasks.enqueue(user, f"s-{uuid.uuid4().hex[:8]}", "welcome", company=company)
    failure = Failure(reason="api_rejected", detail="refused", status=400, worker="test")
    assert runtime.store.dead_letter(ident, failure)
    return ident


def test_the_failed_list_filters_by_company_in_the_cli_the_api_and_the_console(
    service, runtime, companies, user_id
):
    mine = _dead(runtime, user_id, companies.connected)
    default = _dead(runtime, user_id, None)

    listed = notify("failed", "list", "--user", user_id, "--company", companies.connected, "--json")
    assert listed.returncode == 0, listed.stderr
    items = json.loads(listed.stdout)["items"]
    assert [(item["id"], item["company"]) for item in items] == [(mine, companies.connected)]
    by_default = notify("failed", "list", "--user", user_id, "--company", "default", "--json")
    assert [item["id"] for item in json.loads(by_default.stdout)["items"]] == [default]
    bad = notify("failed", "list", "--company", "ACME")
    assert bad.returncode == 2 and "--company" in bad.stderr

    query = {"status": "failed", "user": user_id, "company": companies.connected}
    page = httpx.get(f"{service}/notifications", params=query, headers=OPERATOR)
    assert page.status_code == 200, page.text
    assert [item["NotificationURI"].rsplit("/", 1)[1] for item in page.json()] == [mine]
    assert page.json()[0]["Failure"]["Company"] == companies.connected
    refused = httpx.get(f"{service}/notifications", params={**query, "company": "x"},
                        headers=OPERATOR)  # fmt: skip
    assert refused.status_code == 400

    with httpx.Client(base_url=service, follow_redirects=True) as browser:
        login = browser.get("/console")
        token = CSRF.search(login.text)
        assert token is not None
        browser.post(
            "/console/login", data={"csrf": token.group(1), "key": OPERATOR_KEY, "next": "/console"}
        )
        console = browser.get("/console", params={"company": companies.connected, "limit": "100"})
        assert console.status_code == 200
        assert mine in console.text and default not in console.text
        shown = browser.get(f"/console/messages/{mine}")
        assert companies.connected in shown.text


# -- notify stats: the companies with the most messages waiting ------------------------------------


def test_stats_show_the_companies_with_the_most_messages_waiting_and_no_metric_names_one(
    runtime, sandbox, user_id
):
    registry = CompanyRegistry(runtime.redis, Cipher(None))
    busy, quiet = _uuid(), _uuid()
    now = int(time.time() * 1000)
    for company in (busy, quiet):
        registry.connected(company, "refresh", None, sandbox.root_url, now)
    # Recorded as intake records them, not published: a worker of the session (another module's)
    # must not finish them while this test counts (the mover hands them out after the publish
    # grace, 30 s here). More than the other companies of this module: the top few list it.
    messages = [Message.create(user_id, f"s-{n}", "welcome", None, None, busy) for n in range(400)]
    try:
        runtime.store.create_many([(message.id, message.to_wire()) for message in messages])
        lone = Message.create(user_id, "s-quiet", "welcome", None, None, quiet)
        assert runtime.store.create(lone.id, lone.to_wire()) == (True, "queued")
        waiting = collect(runtime).waiting_by_company
        assert waiting[busy] == 400
        assert runtime.redis.zscore(keys.COMPANY_WAITING, quiet) == 1

        # A message that ends leaves the count (dead-lettered, delivered); replayed, it waits again.
        assert runtime.store.dead_letter(lone.id, Failure(reason="api_rejected", detail="no"))
        assert runtime.redis.zscore(keys.COMPANY_WAITING, quiet) is None
        replayed = runtime.store.replay(lone.id)
        assert replayed is not None
        assert runtime.redis.zscore(keys.COMPANY_WAITING, quiet) == 1
        claim = runtime.store.claim(replayed, owner="o-1", worker="test", task_id="t-1")
        assert claim.verdict == "go"
        attempt = AttemptRecord(1, now_ms(), "delivered", 200, "http_200", 12, str(uuid.uuid4()))
        assert runtime.store.delivered(lone.id, attempt)
        assert runtime.redis.zscore(keys.COMPANY_WAITING, quiet) is None

        shown = notify("stats")
        assert shown.returncode == 0, shown.stderr
        assert "waiting, by company" in shown.stdout
        assert f"400  {busy}" in shown.stdout
        assert json.loads(notify("stats", "--json").stdout)["waiting_by_company"][busy] == 400
        metrics = render_prometheus(collect(runtime))
        assert busy not in metrics and quiet not in metrics
    finally:
        # Never published, but the session worker's mover hands them out after the publish
        # grace (30 s): 400 left in place made 16,000 deferrals in 15 s.
        _cancel_unfinished(runtime, [message.id for message in messages])
