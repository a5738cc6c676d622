"""Issue 21's fairness scenario, scaled down, with looser bounds than bench/run.py's targets:
company A queues a backlog, then company B sends 20 messages a second for 10 s; B's messages
are delivered about as fast as on an idle system while A's backlog keeps most of its pace."""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest
from cryptography.fernet import Fernet

from sandbox.concur import Sandbox
from tests.harness import TEST_TOKEN, Isolated, wait_for
from worker.concur.companies import connect
from worker.concur.oauth import OAuthConfig
from worker.limits.breaker import geolocation_name
from worker.shapes.models import Message
from worker.store import keys
from worker.store.companies import CompanyRegistry
from worker.store.sealing import Cipher

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _fair_dispatch(monkeypatch: pytest.MonkeyPatch) -> None:
    # Fair dispatch is opt-in (NOTIFY_DISPATCH=fair): these tests' runtimes and workers turn it on.
    monkeypatch.setenv("NOTIFY_DISPATCH", "fair")


COMPANY_A = "aaaaaaaa-0000-4000-8000-00000000000a"
COMPANY_B = "bbbbbbbb-0000-4000-8000-00000000000b"
A_TEMPLATE, B_TEMPLATE = "welcome", "expense-approved"
A_COUNT = 5000
B_RATE, B_SECONDS = 20, 10
LATENCY_MS = 200


def _queue(isolated: Isolated, company: str, users: list[str], template: str) -> list[str]:
    # The "company" field is written into the request here; the intake side (issue 21 item 2)
    # adds it to Message.to_wire itself.
    items = []
    for user in users:
        message = Message.create(user, "s", template, "https://app.example.com/r/1")
        items.append((message.id, {**message.to_wire(), "company": company}))
    isolated.runtime.store.create_many(items)
    return [message_id for message_id, _ in items]


def test_a_backlog_of_one_company_does_not_hold_back_another(isolated, start_worker):
    key = Fernet.generate_key().decode()
    registry = CompanyRegistry(isolated.runtime.redis, Cipher(key))
    run = uuid.uuid4().hex[:6]
    with Sandbox(tokens=[TEST_TOKEN], latency_ms=LATENCY_MS) as api:
        # Both companies live at the sandbox's geolocation, connected with their request
        # tokens: the workers post with each company's own token.
        hosts = tuple(geolocation_name(url) for url in api.geolocations().values())
        config = OAuthConfig(
            client_id="partner-app",
            client_secret="sandbox-client-secret",
            geolocation=api.root_url,
            extra_geolocation_hosts=hosts,
        )
        for company in (COMPANY_A, COMPANY_B):
            request_token = f"rq-{uuid.uuid4().hex}"
            api.create_company(company, geolocation="us", request_token=request_token)
            connect(registry, config, company, request_token=request_token)
        for start in range(0, A_COUNT, 1000):
            _queue(
                isolated, COMPANY_A, [f"a{run}-{i}" for i in range(start, start + 1000)], A_TEMPLATE
            )
        start_worker(
            **isolated.env,
            NOTIFY_API_BASE_URL=api.url,
            NOTIFY_WORKER_CONCURRENCY="2",
            NOTIFY_OAUTH_CLIENT_ID="partner-app",
            NOTIFY_OAUTH_CLIENT_SECRET="sandbox-client-secret",
            NOTIFY_TOKEN_ENCRYPTION_KEY=key,
            NOTIFY_OAUTH_EXTRA_GEOLOCATION_HOSTS=",".join(hosts),
        )
        wait_for(lambda: api.stats()["delivered"] > 0, timeout=30, what="A flowing")
        b_ids: list[str] = []
        b_start = time.time()
        for i in range(B_RATE * B_SECONDS):
            pause = b_start + i / B_RATE - time.time()
            if pause > 0:
                time.sleep(pause)
            b_ids += _queue(isolated, COMPANY_B, [f"b{run}-{i}"], B_TEMPLATE)
        b_end = time.time()
        total = A_COUNT + len(b_ids)
        wait_for(lambda: api.stats()["delivered"] >= total, timeout=120, what="the drain")
        a_times = sorted(r["at"] for r in api.requests(template_id=A_TEMPLATE))
        b_posts = api.requests(template_id=B_TEMPLATE)
    # Everything delivered, once.
    assert len(a_times) == A_COUNT
    assert len(b_posts) == len(b_ids)
    # The scenario has teeth: A's backlog outlasted B's sending, so a FIFO queue would have made
    # B's last messages wait for most of it.
    assert a_times[-1] > b_end
    # B: enqueue -> delivered, from the records.
    records: list[dict[str, Any] | None] = [isolated.runtime.store.status(i) for i in b_ids]
    latencies = sorted(int(r["updated"]) - int(r["created"]) for r in records if r)
    p99 = latencies[int(0.99 * len(latencies))]
    assert p99 < 1500, f"B's p99 {p99} ms (API latency {LATENCY_MS} ms)"
    # A kept most of its pace while B sent: its rate within B's window against its rate after.
    within = sum(1 for at in a_times if b_start <= at < b_end) / (b_end - b_start)
    after = [at for at in a_times if at >= b_end]
    alone = len(after) / max(1e-3, after[-1] - after[0])
    assert within >= 0.7 * alone, f"A {within:.0f}/s while B sent, {alone:.0f}/s after"
    redis = isolated.runtime.redis
    wait_for(lambda: redis.get(keys.DISPATCHED) == "0", timeout=5, what="the depth back to 0")
