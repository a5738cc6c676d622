"""Fair share on real Redis, real worker processes and the sandbox: lanes per (company,
partner), the dispatch script's round-robin, the depth counter, and the guarantees kept when a
dispatcher dies or two of them race (issue 21 item 5)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import pytest
from cryptography.fernet import Fernet

from tests import harness
from tests.harness import Isolated, wait_for
from worker.delivery.dispatcher import Dispatcher, DispatchPolicy
from worker.front.stats import collect, render_prometheus
from worker.queue.publisher import Publisher
from worker.shapes.models import DEFAULT_COMPANY, Message
from worker.store import keys
from worker.store.codec import now_ms
from worker.store.companies import CompanyRegistry
from worker.store.records import MessageStore
from worker.store.sealing import Cipher


@pytest.fixture(autouse=True)
def _fair_dispatch(monkeypatch: pytest.MonkeyPatch) -> None:
    # Fair dispatch is opt-in (NOTIFY_DISPATCH=fair): these tests' runtimes and workers turn it on.
    monkeypatch.setenv("NOTIFY_DISPATCH", "fair")


ACME = "0f3c2f6e-4a1b-4c2d-9e8f-7a6b5c4d3e2f"
GLOBEX = "1a2b3c4d-5e6f-4a1b-8c2d-3e4f5a6b7c8d"
GEO = "https://us2.api.concursolutions.com"
EMEA = "https://emea.api.concursolutions.com"
URL = "https://app.example.com/reports/1"
HOME = "http://127.0.0.1"  # the default company's geolocation in these calls


def _messages(
    count: int, *, company: str = DEFAULT_COMPANY, partner: str | None = None
) -> list[tuple[str, dict[str, Any]]]:
    """``count`` new requests for ``company`` from ``partner``, as the producer records them.

    The ``company`` field is written into the request here; the intake side (issue 21 item 2)
    adds it to ``Message.to_wire`` itself.
    """
    run = uuid.uuid4().hex[:8]
    items = []
    for i in range(count):
        message = Message.create(f"fs-{run}-{i}", f"s{i}", "welcome", URL, partner)
        wire = message.to_wire()
        if company != DEFAULT_COMPANY:
            wire["company"] = company
        items.append((message.id, wire))
    return items


def _dispatch(store: MessageStore, limit: int = 1000, **overrides: Any) -> list[str]:
    args: dict[str, Any] = {
        "limit": limit,
        "depth_per_worker": 100_000,
        "live_since_ms": now_ms(),
        "quantum": 1,
        "default_geolocation": HOME,
    }
    args.update(overrides)
    return [envelope.id for envelope in store.dispatch(**args)]


def _registry(isolated: Isolated) -> CompanyRegistry:
    return CompanyRegistry(isolated.runtime.redis, Cipher(Fernet.generate_key().decode()))


def _connect(registry: CompanyRegistry, company: str, geolocation: str = GEO) -> None:
    registry.connected(company, "refresh-" + company[:8], None, geolocation, now_ms())


def _ids(items: list[tuple[str, dict[str, Any]]]) -> list[str]:
    return [message_id for message_id, _ in items]


def test_a_laned_message_is_queued_off_the_schedule_and_counted_waiting(isolated):
    store = isolated.runtime.store
    items = _messages(3)
    assert store.create_many(items) == [(True, "queued")] * 3
    redis = isolated.runtime.redis
    assert redis.zcard(keys.SCHEDULE) == 0  # the mover must not publish a backlog
    assert redis.lrange(keys.lane(DEFAULT_COMPANY, "default"), 0, -1) == _ids(items)
    assert redis.hget(keys.LIVE, "laned") == "3"
    # Sending the same again lanes nothing new.
    assert store.create_many(items) == [(False, "queued")] * 3
    assert redis.hget(keys.LIVE, "laned") == "3"
    stats = collect(isolated.runtime)
    assert stats.waiting_in_lanes == 3
    assert "notify_lane_waiting 3.0" in render_prometheus(stats)


def test_order_within_a_lane_is_kept(isolated):
    store = isolated.runtime.store
    items = _messages(50, company=ACME, partner="acme")
    _connect(_registry(isolated), ACME)
    store.create_many(items)
    taken = _dispatch(store, limit=7)
    while len(taken) < 50:
        taken += _dispatch(store, limit=7)
    assert taken == _ids(items)


def test_companies_take_turns(isolated):
    store = isolated.runtime.store
    registry = _registry(isolated)
    _connect(registry, ACME)
    _connect(registry, GLOBEX)
    big = _messages(100, company=ACME)  # a backlog first
    small = _messages(5, company=GLOBEX)  # then a few from another company
    store.create_many(big)
    store.create_many(small)
    taken = _dispatch(store, limit=10)
    owner = {**dict.fromkeys(_ids(big), "A"), **dict.fromkeys(_ids(small), "G")}
    assert [owner[i] for i in taken] == ["A", "G"] * 5
    # Once the small company is served, the backlog has the whole capacity.
    assert {owner[i] for i in _dispatch(store, limit=20)} == {"A"}


def test_partners_of_one_company_take_turns_within_its_share(isolated):
    store = isolated.runtime.store
    registry = _registry(isolated)
    _connect(registry, ACME)
    _connect(registry, GLOBEX)
    acme_first = _messages(30, company=ACME, partner="first")
    acme_second = _messages(30, company=ACME, partner="second")
    globex = _messages(30, company=GLOBEX, partner="first")
    for items in (acme_first, acme_second, globex):
        store.create_many(items)
    owner = {
        **dict.fromkeys(_ids(acme_first), "A1"),
        **dict.fromkeys(_ids(acme_second), "A2"),
        **dict.fromkeys(_ids(globex), "G"),
    }
    taken = [owner[i] for i in _dispatch(store, limit=8)]
    # Companies alternate; within ACME's turns its two partners alternate.
    assert taken == ["A1", "G", "A2", "G", "A1", "G", "A2", "G"]


def test_a_company_not_connected_waits_while_the_others_flow(isolated):
    store = isolated.runtime.store
    registry = _registry(isolated)
    _connect(registry, ACME)
    _connect(registry, GLOBEX)
    registry.needs_reconnect(GLOBEX, "refresh token refused", now_ms())
    acme = _messages(10, company=ACME)
    globex = _messages(10, company=GLOBEX)
    store.create_many(globex)
    store.create_many(acme)
    assert sorted(_dispatch(store)) == sorted(_ids(acme))
    redis = isolated.runtime.redis
    assert redis.lrange(keys.lane(GLOBEX, "default"), 0, -1) == _ids(globex)
    assert redis.hget(keys.LIVE, "laned") == "10"
    # Reconnected: its messages go, in their order.
    _connect(registry, GLOBEX)
    assert _dispatch(store) == _ids(globex)
    assert redis.hget(keys.LIVE, "laned") == "0"
    assert redis.llen(keys.LANES) == 0


def test_a_paused_geolocation_holds_its_companies_only(isolated):
    store = isolated.runtime.store
    registry = _registry(isolated)
    _connect(registry, ACME, GEO)
    _connect(registry, GLOBEX, EMEA)
    acme = _messages(5, company=ACME)
    globex = _messages(5, company=GLOBEX)
    home = _messages(5)
    for items in (acme, globex, home):
        store.create_many(items)
    taken = _dispatch(store, paused_geolocations=[EMEA, HOME])
    assert sorted(taken) == sorted(_ids(acme))
    assert sorted(_dispatch(store)) == sorted(_ids(globex) + _ids(home))


def test_the_depth_bounds_what_is_dispatched_and_claims_give_it_back(isolated):
    store = isolated.runtime.store
    items = _messages(30)
    store.create_many(items)
    redis = isolated.runtime.redis
    first = store.dispatch(
        limit=100,
        depth_per_worker=8,
        live_since_ms=now_ms(),
        quantum=1,
        default_geolocation=HOME,
    )
    assert len(first) == 8  # no live worker counts as one
    assert redis.get(keys.DISPATCHED) == "8"
    assert _dispatch(store, depth_per_worker=8) == []
    # Each dispatched message waits on the schedule a grace period ahead, flagged.
    for envelope in first:
        assert redis.hget(keys.message(envelope.id), "dq") == "1"
        assert redis.zscore(keys.SCHEDULE, envelope.id) > now_ms()
        # The mark is bookkeeping, not part of the message's status.
        assert "dq" not in store.status(envelope.id)
    claims = store.claim_many([(e, "o") for e in first[:3]], worker="w", task_id="t")
    assert [c.verdict for c in claims] == ["go"] * 3
    assert redis.get(keys.DISPATCHED) == "5"
    # A second copy of a task (a redelivery) does not count a message off twice.
    assert store.claim(first[0], owner="o2", worker="w", task_id="t2").verdict != "go"
    assert redis.get(keys.DISPATCHED) == "5"
    assert len(_dispatch(store, depth_per_worker=8)) == 3


def test_the_room_below_the_depth_is_taken_in_whole_tasks(isolated):
    store = isolated.runtime.store
    store.create_many(_messages(100))
    assert len(_dispatch(store, depth_per_worker=50, task_size=20)) == 40
    assert _dispatch(store, depth_per_worker=50, task_size=20) == []  # room for 10: not a task
    # A depth below one task still dispatches (what it allows).
    assert len(_dispatch(store, depth_per_worker=45, task_size=50)) == 5
    assert isolated.runtime.redis.get(keys.DISPATCHED) == "45"


def test_the_lanes_of_a_disconnected_company_go_to_the_workers(isolated):
    store = isolated.runtime.store
    registry = _registry(isolated)
    _connect(registry, ACME)
    _connect(registry, GLOBEX)
    registry.needs_reconnect(ACME, "refresh token refused", now_ms())
    acme = _messages(5, company=ACME)
    globex = _messages(2500, company=GLOBEX, partner="p")
    store.create_many(acme)
    store.create_many(globex)
    policy = DispatchPolicy(
        batch=20,
        task_size=20,
        depth_per_worker=100,
        default_geolocation=HOME,
        reconnect_grace_ms=3_600_000,
    )
    publisher = Publisher(lambda batch: None, 20)
    dispatcher = Dispatcher(store, publisher, registry, policy)
    redis = isolated.runtime.redis
    assert dispatcher.sweep() == 0  # within the grace: both wait
    registry.disconnect(GLOBEX, now_ms())
    assert dispatcher.sweep() == 2500
    due = redis.zrangebyscore(keys.SCHEDULE, "-inf", now_ms())
    assert sorted(due) == sorted(_ids(globex))
    assert redis.lrange(keys.LANES, 0, -1) == [ACME]
    assert redis.hget(keys.LIVE, "laned") == "5"
    # Past the reconnect grace, a company's lanes go too.
    late = Dispatcher(store, publisher, registry, replace(policy, reconnect_grace_ms=0))
    assert late.sweep() == 5
    assert redis.llen(keys.LANES) == 0
    assert redis.hget(keys.LIVE, "laned") == "0"


_DISPATCH_IN_A_PROCESS = """
import json, os, signal, sys, time
from redis import Redis
from worker.store.records import MessageStore
from worker.store.codec import now_ms
redis = Redis.from_url(os.environ["NOTIFY_REDIS_URL"], decode_responses=True)
store = MessageStore(redis, publish_grace_seconds=float(sys.argv[1]), lease_seconds=12,
                     status_ttl_seconds=3600, laned=True)
taken = []
redis.incr("test:ready")
while not redis.get("test:go"):  # the racers start together
    time.sleep(0.001)
while True:
    batch = store.dispatch(limit=25, depth_per_worker=100_000, live_since_ms=now_ms(), quantum=1,
                           default_geolocation="http://127.0.0.1")
    if not batch:
        break
    taken += [e.id for e in batch]
    if sys.argv[2] == "die":  # killed between the dispatch and the publish
        os.kill(os.getpid(), signal.SIGKILL)
print(json.dumps(taken))
"""


def _dispatch_in_a_process(isolated: Isolated, grace: float, then: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", _DISPATCH_IN_A_PROCESS, str(grace), then],
        env={**os.environ, **isolated.env},
        cwd=harness.ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )


def test_two_dispatchers_in_two_processes_never_take_one_message_twice(isolated):
    store = isolated.runtime.store
    registry = _registry(isolated)
    everything: list[str] = []
    for company in (ACME, GLOBEX):
        _connect(registry, company)
        for partner in ("p1", "p2"):
            items = _messages(1000, company=company, partner=partner)
            store.create_many(items)
            everything += _ids(items)
    everything += _ids(items := _messages(1000))
    store.create_many(items)
    racers = [_dispatch_in_a_process(isolated, 60, "publish") for _ in range(2)]
    redis = isolated.runtime.redis
    wait_for(lambda: redis.get("test:ready") == "2", timeout=30, what="both racers ready")
    redis.set("test:go", 1)
    outputs = [json.loads(racer.communicate(timeout=60)[0]) for racer in racers]
    assert all(outputs), "both dispatchers took part"
    assert not set(outputs[0]) & set(outputs[1])
    assert sorted(outputs[0] + outputs[1]) == sorted(everything)
    assert isolated.runtime.redis.get(keys.DISPATCHED) == str(len(everything))


@pytest.fixture
def worker_of(isolated: Isolated, start_worker: Any) -> Iterator[Any]:
    def start(**env: str) -> harness.WorkerProcess:
        return start_worker(**isolated.env, **env)

    yield start


def test_a_dispatcher_killed_between_dispatch_and_publish_loses_nothing(
    isolated, worker_of, sandbox
):
    store = isolated.runtime.store
    items = _messages(40)
    store.create_many(items)
    killed = _dispatch_in_a_process(isolated, 2, "die")
    isolated.runtime.redis.set("test:go", 1)
    killed.wait(timeout=30)
    assert killed.returncode == -9
    redis = isolated.runtime.redis
    lost = redis.zrange(keys.SCHEDULE, 0, -1)
    assert len(lost) == 25 and redis.get(keys.DISPATCHED) == "25"
    # A worker: its dispatcher takes the 15 left in the lane; its mover publishes the 25 the
    # killed one took once their grace is over. Each is posted once.
    worker_of()
    users = {request["userId"]: message_id for message_id, request in items}
    wait_for(
        lambda: all(isolated.state(i) == "delivered" for i in _ids(items)),
        timeout=30,
        what="every message delivered",
    )
    assert all(len(sandbox.requests(user_id=user)) == 1 for user in users)
    wait_for(lambda: redis.get(keys.DISPATCHED) == "0", timeout=5, what="the depth back to 0")
    assert redis.hget(keys.LIVE, "laned") == "0"


def test_two_companies_drain_through_workers_and_the_counter_returns_to_zero(
    isolated, worker_of, sandbox
):
    # A registry company the sandbox knows, connected with its request token (the workers post
    # with its own token), beside the default company.
    from worker.concur.companies import connect
    from worker.concur.oauth import OAuthConfig
    from worker.limits.breaker import geolocation_name

    key = Fernet.generate_key().decode()
    company = str(uuid.uuid4())
    request_token = f"rq-{uuid.uuid4().hex}"
    sandbox.create_company(company, geolocation="us", request_token=request_token)
    hosts = tuple(geolocation_name(url) for url in sandbox.geolocations().values())
    config = OAuthConfig(
        client_id="partner-app",
        client_secret="sandbox-client-secret",
        geolocation=sandbox.root_url,
        extra_geolocation_hosts=hosts,
    )
    registry = CompanyRegistry(isolated.runtime.redis, Cipher(key))
    connect(registry, config, company, request_token=request_token)
    items = _messages(150, company=company, partner="acme") + _messages(150)
    isolated.runtime.store.create_many(items)
    oauth = {
        "NOTIFY_OAUTH_CLIENT_ID": "partner-app",
        "NOTIFY_OAUTH_CLIENT_SECRET": "sandbox-client-secret",
        "NOTIFY_TOKEN_ENCRYPTION_KEY": key,
        "NOTIFY_OAUTH_EXTRA_GEOLOCATION_HOSTS": ",".join(hosts),
    }
    worker_of(NOTIFY_DISPATCH_DEPTH="20", **oauth)
    worker_of(NOTIFY_DISPATCH_DEPTH="20", **oauth)
    redis = isolated.runtime.redis
    wait_for(
        lambda: all(isolated.state(i) == "delivered" for i in _ids(items)),
        timeout=60,
        what="every message delivered",
    )
    assert all(len(sandbox.requests(user_id=r["userId"])) == 1 for _, r in items)
    wait_for(lambda: redis.get(keys.DISPATCHED) == "0", timeout=5, what="the depth back to 0")
    assert redis.hget(keys.LIVE, "laned") == "0"
    assert redis.llen(keys.LANES) == 0


def test_fifo_publishes_at_intake_in_arrival_order_as_before(isolated):
    import tasks
    from worker.runtime import Runtime
    from worker.settings import load_settings

    settings = isolated.runtime.settings
    fifo = Runtime.from_settings(
        load_settings(redis_url=settings.redis_url, queue_name=settings.queue_name, dispatch="fifo")
    )
    try:
        ids = tasks.enqueue_many(
            [(f"fifo-{uuid.uuid4().hex[:8]}", f"s{i}", "welcome", None) for i in range(3)],
            runtime=fifo,
        )
        assert fifo.publisher.flush()
        redis = isolated.runtime.redis
        assert sorted(redis.zrange(keys.SCHEDULE, 0, -1)) == sorted(ids)
        assert redis.llen(keys.LANES) == 0 and not redis.hget(keys.LIVE, "laned")
        assert redis.llen(settings.queue_name) == 1  # one task of three
    finally:
        fifo.close()


def test_an_open_breaker_holds_the_lanes_of_its_geolocation_only(isolated):
    # The dispatcher asks OpenBreakers (a breaker per geolocation, by name) which geolocations
    # are paused: forced open by an operator, emea's lanes wait while us and home flow.
    from worker.delivery.dispatcher import OpenBreakers
    from worker.limits.breaker import BreakerPolicy, Breakers, geolocation_name

    store = isolated.runtime.store
    registry = _registry(isolated)
    _connect(registry, ACME, GEO)
    _connect(registry, GLOBEX, EMEA)
    acme, globex, home = _messages(3, company=ACME), _messages(3, company=GLOBEX), _messages(3)
    for items in (acme, globex, home):
        store.create_many(items)
    breakers = Breakers(isolated.runtime.redis, BreakerPolicy(enabled=True), lambda: HOME)
    emea = breakers.for_geolocation(EMEA)
    emea.force_open()
    clock = [0.0]
    open_now = OpenBreakers(breakers, refresh_seconds=1.0, clock=lambda: clock[0])
    assert geolocation_name(EMEA) in open_now()
    taken = _dispatch(store, paused_geolocations=open_now())
    assert sorted(taken) == sorted(_ids(acme) + _ids(home))
    emea.close()
    assert geolocation_name(EMEA) in open_now()  # read again only after refresh_seconds
    clock[0] = 1.0
    assert open_now() == []
    assert sorted(_dispatch(store, paused_geolocations=open_now())) == sorted(_ids(globex))
