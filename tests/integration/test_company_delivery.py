"""Delivering to many companies (issue 21, items 3 and 4), end to end: real ``celery worker``
processes, a Redis database of the test's own, and a sandbox of this module's own at two
geolocations, ``us`` (the primary, where the default company's posts go) and ``emea``, whose
token endpoint plays Concur's for each company.

Companies are connected as an operator does (``worker.concur.companies.connect``: the password
grant with the company's request token, at its own geolocation after Concur's code 16); their
messages are recorded with a ``company`` and published as the producer does.
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.fernet import Fernet

from sandbox.concur import Sandbox
from tests.harness import Isolated, WorkerProcess, wait_for
from worker.concur.companies import connect
from worker.concur.oauth import OAuthConfig
from worker.front.stats import collect, render_prometheus
from worker.limits.breaker import geolocation_name
from worker.queue.envelopes import Envelope
from worker.rules import outcomes
from worker.shapes.models import Message
from worker.store import keys
from worker.store.companies import CompanyRegistry, shared_access_of
from worker.store.sealing import Cipher

CLIENT_ID = "partner-app"
CLIENT_SECRET = "sandbox-client-secret"  # the sandbox's default app secret
FERNET_KEY = Fernet.generate_key().decode()
STATIC_TOKEN = f"static-{uuid.uuid4().hex}"
URL = "https://app.example.com/x"


@pytest.fixture(scope="module")
def concur() -> Iterator[Sandbox]:
    """This module's own sandbox at two geolocations; the default company's token is static."""
    with Sandbox(tokens=[STATIC_TOKEN], geolocations=["us", "emea"]) as sandbox:
        yield sandbox


@pytest.fixture
def fresh(concur: Sandbox) -> Sandbox:
    concur.reset()
    return concur


def workers_env(isolated: Isolated, concur: Sandbox, **extra: str) -> dict[str, str]:
    """Workers on the test's database and queue, posting to this sandbox: the default company
    by ``NOTIFY_API_TOKEN``, registry companies with the app's OAuth client."""
    return {
        **isolated.env,
        "NOTIFY_API_BASE_URL": concur.url,
        "NOTIFY_API_TOKEN": STATIC_TOKEN,
        "NOTIFY_OAUTH_CLIENT_ID": CLIENT_ID,
        "NOTIFY_OAUTH_CLIENT_SECRET": CLIENT_SECRET,
        "NOTIFY_TOKEN_ENCRYPTION_KEY": FERNET_KEY,
        # Today's trust rules: a geolocation that is not a Concur host must be listed.
        "NOTIFY_OAUTH_EXTRA_GEOLOCATION_HOSTS": ",".join(geolocation_hosts(concur)),
        "NOTIFY_MAX_ATTEMPTS": "8",
        **extra,
    }


def geolocation_hosts(concur: Sandbox) -> tuple[str, ...]:
    return tuple(geolocation_name(url) for url in concur.geolocations().values())


def registry_of(isolated: Isolated) -> CompanyRegistry:
    return CompanyRegistry(isolated.runtime.redis, Cipher(FERNET_KEY))


def connected_company(isolated: Isolated, concur: Sandbox, geolocation: str) -> str:
    """A new company living at ``geolocation``, connected with its request token."""
    company = str(uuid.uuid4())
    request_token = f"rq-{uuid.uuid4().hex}"
    concur.create_company(company, geolocation=geolocation, request_token=request_token)
    config = OAuthConfig(
        client_id=CLIENT_ID,
        client_secret=CLIENT_SECRET,
        geolocation=concur.root_url,
        extra_geolocation_hosts=geolocation_hosts(concur),
    )
    connect(registry_of(isolated), config, company, request_token=request_token)
    return company


def send(isolated: Isolated, company: str | None, count: int, tag: str) -> list[str]:
    """Record ``count`` messages for ``company`` (None: the default company) and publish them."""
    store = isolated.runtime.store
    items: list[tuple[str, dict[str, Any]]] = []
    for i in range(count):
        message = Message.create(f"{tag}-{i}", "s-1", "welcome", URL)
        request = message.to_wire()
        if company is not None:
            request["company"] = company
        items.append((f"{message.id}{uuid.uuid4().hex[:6]}", request))
    created = store.create_many(items)
    assert all(ok for ok, _state in created)
    isolated.runtime.publish([Envelope(mid, 1, request) for mid, request in items])
    isolated.runtime.publisher.flush(30)
    return [mid for mid, _request in items]


def states(isolated: Isolated, ids: list[str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for mid in ids:
        state = isolated.state(mid) or "missing"
        counts[state] = counts.get(state, 0) + 1
    return counts


def all_in(isolated: Isolated, ids: list[str], state: str) -> bool:
    return states(isolated, ids) == {state: len(ids)}


def test_each_post_carries_its_companys_token_to_its_companys_geolocation(
    start_worker: Callable[..., WorkerProcess], isolated: Isolated, fresh: Sandbox
) -> None:
    acme = connected_company(isolated, fresh, "us")
    globex = connected_company(isolated, fresh, "emea")
    connected = {c: fresh.company(c)["tokenRequests"] for c in (acme, globex)}
    start_worker("companies", **workers_env(isolated, fresh))
    # One batch mixes them: the default company's, acme's and globex's messages together.
    ids = send(isolated, None, 30, f"d{uuid.uuid4().hex[:6]}")
    ids += send(isolated, acme, 30, f"a{uuid.uuid4().hex[:6]}")
    ids += send(isolated, globex, 30, f"g{uuid.uuid4().hex[:6]}")
    wait_for(lambda: all_in(isolated, ids, "delivered"), timeout=60, what="every delivery")

    def seen(company: str) -> set[tuple[str | None, str, int]]:
        records = fresh.requests(company=company)
        return {(r["company"], r["geolocation"], r["status"]) for r in records}

    assert seen("default") == {(None, "us", 200)}
    assert seen(acme) == {(acme, "us", 200)}
    assert seen(globex) == {(globex, "emea", 200)}
    assert fresh.stats(company=acme)["delivered"] == 30
    assert fresh.stats(company=globex, geolocation="emea")["delivered"] == 30
    # No token request by the worker: each connection's own grant shared its access token.
    assert {c: fresh.company(c)["tokenRequests"] - n for c, n in connected.items()} == {
        acme: 0,
        globex: 0,
    }


def test_a_revoked_company_waits_without_spending_attempts_while_another_is_delivered(
    start_worker: Callable[..., WorkerProcess], isolated: Isolated, fresh: Sandbox
) -> None:
    # Long enough that globex's 400 are through well within it on a busy machine too (at load
    # 17 on 2 cores they took more than 8 s): the test pins that they did not wait for acme.
    grace = 20.0
    acme = connected_company(isolated, fresh, "us")
    globex = connected_company(isolated, fresh, "us")
    worker = start_worker(
        "revoked",
        **workers_env(isolated, fresh, NOTIFY_COMPANY_RECONNECT_GRACE_SECONDS=str(grace)),
    )
    # Both companies deliver; then Concur revokes acme's tokens (an admin removed the app).
    warm = send(isolated, acme, 5, f"w{uuid.uuid4().hex[:6]}")
    wait_for(lambda: all_in(isolated, warm, "delivered"), timeout=30, what="acme's first")
    fresh.update_company(acme, revoke_refresh_tokens=True, revoke_access_tokens=True)
    revoked_at = time.monotonic()
    waiting = send(isolated, acme, 40, f"a{uuid.uuid4().hex[:6]}")
    flowing = send(isolated, globex, 400, f"g{uuid.uuid4().hex[:6]}")
    registry = registry_of(isolated)
    wait_for(
        lambda: (found := registry.get(acme)) is not None and found.state == "needs_reconnect",
        timeout=30,
        what="acme to need a reconnection",
    )
    found = registry.get(acme)
    assert found is not None and "refused its refresh token" in (found.reason or "")
    wait_for(lambda: all_in(isolated, flowing, "delivered"), timeout=60, what="globex's")
    globex_done = time.monotonic() - revoked_at
    # Globex's 400 went through while acme's messages waited, well within acme's grace.
    assert globex_done < grace, f"globex took {globex_done:.1f}s"
    globex_stats = fresh.stats(company=globex)
    assert globex_stats["delivered"] == 400
    # Acme's messages wait: none delivered, none dead yet, and no attempt spent on them (at
    # most the one post a message of the first batch made with the revoked access token).
    assert not any(state in ("delivered", "failed") for state in states(isolated, waiting))
    acme_posts = fresh.requests(company=acme)
    assert all(r["status"] == 401 for r in acme_posts[5:])
    assert len(acme_posts) - 5 <= len(waiting)
    for mid in waiting:
        record = isolated.runtime.store.status(mid)
        assert record is not None
        spent = [a for a in record["attempts"] if a.get("outcome") in ("retry", "dead")]
        assert spent == [], record
    # Past the grace: dead letters company_disconnected, and still nothing posted.
    wait_for(lambda: all_in(isolated, waiting, "failed"), timeout=grace + 30, what="dead letters")
    assert time.monotonic() - revoked_at >= grace - 1
    for mid in waiting:
        letter = isolated.runtime.deadletters.get(mid)
        assert letter is not None and letter.reason == outcomes.COMPANY_DISCONNECTED
    assert len(fresh.requests(company=acme)) == len(acme_posts)
    assert "needs to be reconnected" in worker.log()
    assert "rq-" not in worker.log() and "refresh_token=" not in worker.log()


def test_a_disconnected_companys_messages_are_dead_letters_at_once(
    start_worker: Callable[..., WorkerProcess], isolated: Isolated, fresh: Sandbox
) -> None:
    gone = connected_company(isolated, fresh, "emea")
    registry_of(isolated).disconnect(gone, int(time.time() * 1000))
    unknown = str(uuid.uuid4())
    start_worker("disconnected", **workers_env(isolated, fresh))
    ids = send(isolated, gone, 10, f"x{uuid.uuid4().hex[:6]}")
    ids += send(isolated, unknown, 10, f"u{uuid.uuid4().hex[:6]}")
    wait_for(lambda: all_in(isolated, ids, "failed"), timeout=30, what="dead letters")
    reasons = {isolated.runtime.deadletters.get(mid).reason for mid in ids}  # type: ignore[union-attr]
    assert reasons == {outcomes.COMPANY_DISCONNECTED}
    assert fresh.requests(company=gone) == []


def test_an_emea_outage_opens_only_emeas_breaker_and_us_keeps_delivering(
    start_worker: Callable[..., WorkerProcess], isolated: Isolated, fresh: Sandbox
) -> None:
    acme = connected_company(isolated, fresh, "us")
    globex = connected_company(isolated, fresh, "emea")
    fresh.script_geolocation("emea", {"status": 503})
    start_worker(
        "outage",
        **workers_env(
            isolated,
            fresh,
            NOTIFY_BREAKER_ENABLED="true",
            NOTIFY_BREAKER_MIN_CALLS="10",
            NOTIFY_BREAKER_WINDOW_SECONDS="20",
            # Paused messages come back when the breaker would let posts through again (30 s
            # after it opened), well inside the wait below even on a busy machine.
            NOTIFY_BREAKER_OPEN_SECONDS="30",
            NOTIFY_BREAKER_MAX_OPEN_SECONDS="60",
        ),
    )
    emea = geolocation_name(fresh.geolocation_url("emea"))
    stuck = send(isolated, globex, 60, f"g{uuid.uuid4().hex[:6]}")
    breakers = isolated.runtime.breakers
    wait_for(
        lambda: breakers.named(emea).status().state == "open", timeout=30, what="emea's breaker"
    )
    # Us keeps delivering, the default company's and acme's, while emea's breaker is open.
    flowing = send(isolated, acme, 100, f"a{uuid.uuid4().hex[:6]}")
    flowing += send(isolated, None, 100, f"d{uuid.uuid4().hex[:6]}")
    wait_for(lambda: all_in(isolated, flowing, "delivered"), timeout=60, what="us deliveries")
    assert breakers.named(emea).status().state == "open"
    assert breakers.default.status().state == "closed"
    assert emea in breakers.names()
    # Globex's messages wait out the outage with their attempts: none dead.
    assert "failed" not in states(isolated, stuck)
    metrics = render_prometheus(collect(isolated.runtime))
    assert f'notify_breaker_state{{geolocation="{emea}"}} 2' in metrics
    assert 'notify_breaker_state{geolocation="default"} 0' in metrics
    # The outage ends; an operator closes emea's breaker and globex's messages go through.
    fresh.script_geolocation("emea", None)
    breakers.named(emea).close()
    wait_for(lambda: all_in(isolated, stuck, "delivered"), timeout=60, what="globex after")


def test_a_companys_own_pace_holds_it_while_the_default_company_goes_unpaced(
    start_worker: Callable[..., WorkerProcess], isolated: Isolated, fresh: Sandbox
) -> None:
    acme = connected_company(isolated, fresh, "emea")
    start_worker("paced", **workers_env(isolated, fresh, NOTIFY_COMPANY_RATE_LIMIT_PER_SECOND="10"))
    paced = send(isolated, acme, 30, f"a{uuid.uuid4().hex[:6]}")
    free = send(isolated, None, 200, f"d{uuid.uuid4().hex[:6]}")
    wait_for(lambda: all_in(isolated, paced + free, "delivered"), timeout=60, what="deliveries")
    acme_stats = fresh.stats(company=acme)
    # 10 a second with a burst of 1: 30 take about three seconds (unpaced, a fraction of one),
    # and no second sees many more than 10 of acme's posts (posts paced 100 ms apart can reach
    # the sandbox a little bunched on a busy machine: a margin of 5); the default company's are
    # not held by acme's pace.
    assert acme_stats["lastDeliveredAt"] - acme_stats["firstDeliveredAt"] >= 2.0
    assert acme_stats["maxPerSecond"] <= 15, acme_stats
    assert fresh.stats(company="default")["maxPerSecond"] > 15


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.mark.slow
def test_thousands_of_companies_do_not_grow_a_workers_memory_past_the_token_cache_bound(
    start_worker: Callable[..., WorkerProcess], isolated: Isolated, fresh: Sandbox
) -> None:
    # 3,000 companies, one message each, through a worker keeping tokens for 100 of them. Bound
    # stated: the worker's RSS grows by less than 25 MB from the moment its cache is full (100
    # companies served) to the end of the 3,000 (an evicted company costs nothing once dropped).
    total, cache = 3000, 100
    registry = registry_of(isolated)
    companies = [str(uuid.uuid4()) for _ in range(total)]
    geos = ["us", "emea"]
    fresh.create_companies(
        [
            {
                "id": company,
                "geolocation": geos[i % 2],
                "requestToken": f"rq-{company}",
                "refreshToken": f"rt-{company}",
                "clientId": CLIENT_ID,
            }
            for i, company in enumerate(companies)
        ]
    )
    now = int(time.time() * 1000)
    for i, company in enumerate(companies):
        # As `connect --refresh-token` stores it: the company holds a refresh token already.
        registry.connected(company, f"rt-{company}", None, fresh.geolocation_url(geos[i % 2]), now)
    worker = start_worker(
        "thousands", **workers_env(isolated, fresh, NOTIFY_COMPANY_TOKEN_CACHE_SIZE=str(cache))
    )
    assert worker.process is not None
    pid = worker.process.pid

    store = isolated.runtime.store
    items: list[tuple[str, dict[str, Any]]] = []
    for company in companies:
        message = Message.create(f"u-{company[:8]}", "s-1", "welcome", URL)
        request = {**message.to_wire(), "company": company}
        mid = f"{message.id}{company[:6]}"
        items.append((mid, request))

    def publish(chosen: list[tuple[str, dict[str, Any]]]) -> None:
        for start in range(0, len(chosen), 500):
            part = chosen[start : start + 500]
            assert all(ok for ok, _ in store.create_many(part))
            isolated.runtime.publish([Envelope(mid, 1, request) for mid, request in part])
        isolated.runtime.publisher.flush(60)

    warm, rest = items[:cache], items[cache:]
    publish(warm)
    warm_ids = [mid for mid, _ in warm]
    wait_for(lambda: all_in(isolated, warm_ids, "delivered"), timeout=120, what="the first 100")
    before = _rss_kb(pid)
    publish(rest)
    rest_ids = [mid for mid, _ in rest]
    started = time.monotonic()
    wait_for(lambda: all_in(isolated, rest_ids, "delivered"), timeout=600, interval=1, what="all")
    elapsed = time.monotonic() - started
    after = _rss_kb(pid)
    grown_mb = (after - before) / 1024
    print(
        f"\n{total} companies, cache {cache}: RSS {before / 1024:.1f} MB -> {after / 1024:.1f} MB "
        f"(+{grown_mb:.1f} MB); {len(rest)} deliveries in {elapsed:.1f}s"
    )
    assert grown_mb < 25, f"grew {grown_mb:.1f} MB"
    # Each company's token was asked for once (its refresh grant), at its own geolocation.
    asked = {c["id"]: c["tokenRequests"] for c in fresh.companies()["companies"]}
    assert {asked[company] for company in companies} == {1}


def test_two_worker_processes_ask_one_token_per_company_and_share_it_sealed(
    start_worker: Callable[..., WorkerProcess], isolated: Isolated, fresh: Sandbox
) -> None:
    # 40 companies, 6 messages each, shuffled into tasks that both processes take: a company
    # whose messages both processes post still makes one token request (the first process
    # shares its access token; the other reads it, before the company's lock or under it).
    registry = registry_of(isolated)
    companies = [str(uuid.uuid4()) for _ in range(40)]
    fresh.create_companies(
        [
            {
                "id": company,
                "geolocation": "us",
                "requestToken": f"rq-{company}",
                "refreshToken": f"rt-{company}",
                "clientId": CLIENT_ID,
            }
            for company in companies
        ]
    )
    now = int(time.time() * 1000)
    for company in companies:
        registry.connected(company, f"rt-{company}", None, fresh.geolocation_url("us"), now)
    workers = [
        start_worker(f"share{n}", **workers_env(isolated, fresh, NOTIFY_WORKER_CONCURRENCY="4"))
        for n in range(2)
    ]
    store = isolated.runtime.store
    items: list[tuple[str, dict[str, Any]]] = []
    owner: dict[str, str] = {}
    for i in range(6):
        for company in companies:
            message = Message.create(f"u{i}-{company[:8]}", "s-1", "welcome", URL)
            mid = f"{message.id}{uuid.uuid4().hex[:6]}"
            items.append((mid, {**message.to_wire(), "company": company}))
            owner[mid] = company
    random.Random(21).shuffle(items)
    assert all(ok for ok, _ in store.create_many(items))
    isolated.runtime.publish([Envelope(mid, 1, request) for mid, request in items])
    isolated.runtime.publisher.flush(30)
    ids = [mid for mid, _ in items]
    wait_for(lambda: all_in(isolated, ids, "delivered"), timeout=120, what="every delivery")

    asked = {c["id"]: c["tokenRequests"] for c in fresh.companies()["companies"]}
    assert {asked[company] for company in companies} == {1}
    assert {fresh.stats(company=company)["delivered"] for company in companies} == {6}
    # The test shows sharing only if both processes posted for one company at least.
    logs = [w.log_path.read_text(errors="replace") for w in workers]
    posted_by = [{owner[mid] for mid in ids if f"delivered {mid} " in text} for text in logs]
    assert posted_by[0] & posted_by[1], "no company had posts from both processes"

    # Shared sealed: the token is not in Redis in clear text, and it expires from Redis.
    redis = isolated.runtime.redis
    company = companies[0]
    stored = redis.get(keys.company_access(company))
    assert stored is not None
    text = stored.decode() if isinstance(stored, bytes) else str(stored)
    assert text.startswith("f1:")
    shared = shared_access_of(Cipher(FERNET_KEY).open(text))
    assert shared is not None and shared.token and shared.token not in text
    assert shared.geolocation == fresh.geolocation_url("us")
    assert 0 < int(redis.pttl(keys.company_access(company))) <= 3600 * 1000
    # Disconnecting the company deletes its shared token with its refresh token.
    registry.disconnect(company, int(time.time() * 1000))
    assert redis.get(keys.company_access(company)) is None
