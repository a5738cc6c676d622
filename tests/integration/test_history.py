"""The durable history on the real PostgreSQL (issue 16, items 2 and 3).

PostgreSQL: ``NOTIFY_TEST_HISTORY_URL`` if set, else the server on 127.0.0.1:5432 (trust auth,
database ``postgres`` or ``test``), where each run makes a database of its own and drops it at
the end. Without one, every test here is skipped with the reason (and ``.ci/run`` says so).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest
from redis import Redis
from starlette.testclient import TestClient

from tests.harness import OPERATOR_KEY, ROOT, wait_for
from worker.front.api import create_app
from worker.queue.envelopes import Envelope
from worker.runtime import Runtime
from worker.settings import load_settings
from worker.shapes.models import Message
from worker.store import history, keys
from worker.store.codec import AttemptRecord, Failure, now_ms
from worker.store.history import HistoryWriter
from worker.store.records import MessageStore


def _server() -> str | None:
    explicit = os.environ.get("NOTIFY_TEST_HISTORY_URL")
    if explicit:
        return explicit
    for database in ("postgres", "test"):
        url = f"postgresql://postgres@127.0.0.1:5432/{database}"
        try:
            with psycopg.connect(url, connect_timeout=3, autocommit=True):
                return url
        except psycopg.Error:
            continue
    return None


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    server = _server()
    if server is None:
        pytest.skip("no PostgreSQL answers on 127.0.0.1:5432 (set NOTIFY_TEST_HISTORY_URL)")
    if os.environ.get("NOTIFY_TEST_HISTORY_URL"):
        yield server
        return
    name = f"notify_test_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    with psycopg.connect(server, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield server.rsplit("/", 1)[0] + "/" + name
    finally:
        with psycopg.connect(server, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def redis() -> Iterator[Redis]:
    # The run's database; only these tests write the outbox (the session worker has no history).
    client = Redis.from_url(os.environ["NOTIFY_REDIS_URL"], decode_responses=True)
    client.delete(keys.HISTORY_OUTBOX)
    yield client
    client.delete(keys.HISTORY_OUTBOX)


def _later_ms() -> int:
    """A retry's due time no mover reaches during the test: the session worker's mover shares
    this database and, given a retry due now, published it and its worker delivered it before
    the test claimed its second attempt."""
    return now_ms() + 3_600_000


def _store(redis: Redis) -> MessageStore:
    return MessageStore(
        redis, publish_grace_seconds=3600, lease_seconds=60, status_ttl_seconds=86400, history=True
    )


def _writer(redis: Redis, url: str, **options: Any) -> HistoryWriter:
    return HistoryWriter(
        redis, url, consumer=f"test-{uuid.uuid4().hex[:6]}", block_ms=10, **options
    )


def _message() -> Message:
    return Message.create(
        f"user-{uuid.uuid4().hex[:10]}",
        str(uuid.uuid4()),
        "expense-approved",
        "https://app.example.com/reports/7",
        "acme",
    )


def _go(store: MessageStore, message: Message, gen: int) -> None:
    claim = store.claim(
        Envelope(message.id, gen, message.to_wire()), owner="o", worker="w", task_id="t"
    )
    assert claim.verdict == "go", claim


def _attempt(n: int, outcome: str, status: int | None) -> AttemptRecord:
    return AttemptRecord(n, now_ms(), outcome, status, f"http_{status}", 12, str(uuid.uuid4()))


def _delivered_first_time(redis: Redis) -> tuple[MessageStore, Message, AttemptRecord]:
    """A message recorded, claimed and delivered (202) on its first attempt."""
    store = _store(redis)
    message = _message()
    store.create(message.id, message.to_wire())
    _go(store, message, 1)
    attempt = _attempt(1, "delivered", 202)
    store.delivered(message.id, attempt)
    return store, message, attempt


def _rows(url: str, query: str, *args: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        return conn.execute(query.encode(), args).fetchall()


def test_notify_db_upgrade_makes_the_schema_once(pg_url: str) -> None:
    assert history.upgrade(pg_url) in ([], ["0001_history.sql", "0002_first_attempt.sql"])
    assert history.upgrade(pg_url) == []
    assert history.schema_version(pg_url) == 2
    env = {**os.environ, "NOTIFY_HISTORY_URL": pg_url}
    done = subprocess.run(
        [str(ROOT / ".venv/bin/notify"), "db", "upgrade"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "schema at version 2" in done.stdout


def test_history_rows_for_delivered_retried_and_dead_lettered_messages(
    pg_url: str, redis: Redis
) -> None:
    history.upgrade(pg_url)
    store = _store(redis)
    delivered, retried, dead = _message(), _message(), _message()
    for message in (delivered, retried, dead):
        store.create(message.id, message.to_wire())
    _go(store, delivered, 1)
    store.delivered(delivered.id, _attempt(1, "delivered", 202))
    _go(store, retried, 1)
    store.retry(retried.id, "o", _later_ms(), _attempt(1, "retry", 503))
    _go(store, retried, 2)
    store.delivered(retried.id, _attempt(2, "delivered", 200))
    _go(store, dead, 1)
    last = _attempt(1, "dead", 400)
    store.dead_letter(
        dead.id, Failure("http_400", "bad", 400, [], last.correlation_id), owner="o", attempt=last
    )
    assert redis.xlen(keys.HISTORY_OUTBOX) == 4
    entries: Any = redis.xrange(keys.HISTORY_OUTBOX)
    # One field an entry (a JSON object): the writer's client parses one value, not twenty-odd.
    assert [sorted(fields) for _, fields in entries] == [["j"]] * 4
    writer = _writer(redis, pg_url)
    writer.drain()
    assert redis.xlen(keys.HISTORY_OUTBOX) == 0
    attempts = _rows(
        pg_url,
        "SELECT message_id, seq, number, outcome, http_status, partner, template_id"
        " FROM notify_attempt_log WHERE message_id = ANY(%s) ORDER BY message_id, seq",
        [delivered.id, retried.id, dead.id],
    )
    assert sorted(attempts) == sorted(
        [
            (delivered.id, 1, 1, "delivered", 202, "acme", "expense-approved"),
            (retried.id, 1, 1, "retry", 503, "acme", "expense-approved"),
            (retried.id, 2, 2, "delivered", 200, "acme", "expense-approved"),
            (dead.id, 1, 1, "dead", 400, "acme", "expense-approved"),
        ]
    )
    outcomes = _rows(
        pg_url,
        "SELECT message_id, state, reason, attempts, http_status, user_id, url"
        " FROM notify_outcomes WHERE message_id = ANY(%s)",
        [delivered.id, retried.id, dead.id],
    )
    assert sorted(outcomes) == sorted(
        [
            (delivered.id, "delivered", None, 1, 202, delivered.user_id, delivered.url),
            (retried.id, "delivered", None, 2, 200, retried.user_id, retried.url),
            (dead.id, "failed", "http_400", 1, 400, dead.user_id, dead.url),
        ]
    )
    # A delivery on the first attempt is one row: its outcome holds the attempt.
    assert _rows(
        pg_url, "SELECT count(*) FROM notify_attempts WHERE message_id = %s", delivered.id
    ) == [(0,)]
    # The same entries written again (a writer that died before acknowledging) add nothing.
    rows = history.Rows()
    for _, fields in entries:
        rows.add(fields)
    with history.connect(pg_url) as conn, conn.transaction():
        assert rows.insert(conn) == 0
    assert (
        len(
            _rows(
                pg_url,
                "SELECT 1 FROM notify_attempt_log WHERE message_id = ANY(%s)",
                [delivered.id, retried.id, dead.id],
            )
        )
        == 4
    )


def test_a_message_whose_hot_record_expired_is_answered_from_history(
    pg_url: str, redis: Redis
) -> None:
    history.upgrade(pg_url)
    store, message, attempt = _delivered_first_time(redis)
    hot = store.status(message.id)
    _writer(redis, pg_url).drain()
    redis.pexpire(keys.message(message.id), 1)  # the hot window ends
    wait_for(lambda: store.status(message.id) is None, timeout=5, what="the hot record to expire")
    settings = load_settings(operator_keys=OPERATOR_KEY, history_url=pg_url)
    runtime = Runtime.from_settings(settings)
    with TestClient(create_app(settings, runtime)) as client:
        answer = client.get(
            f"/messages/{message.id}", headers={"Authorization": f"Bearer {OPERATOR_KEY}"}
        )
        assert answer.status_code == 200, answer.text
        view = answer.json()
        assert view["status"] == "delivered" and view["partner"] == "acme"
        assert view["userId"] == message.user_id and view["context"] == {"url": message.url}
        assert view["lastHttpStatus"] == 202 and view["correlationId"] == attempt.correlation_id
        assert [a["outcome"] for a in view["attempts"]] == ["delivered"]
        assert view["attempts"][0]["correlationId"] == attempt.correlation_id
        assert hot is not None and view["createdAt"]
        missing = client.get(
            "/messages/nosuchmessage", headers={"Authorization": f"Bearer {OPERATOR_KEY}"}
        )
        assert missing.status_code == 404
    # notify status reads the same.
    env = {**os.environ, "NOTIFY_HISTORY_URL": pg_url}
    shown = subprocess.run(
        [str(ROOT / ".venv/bin/notify"), "status", message.id, "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["source"] == "history"


def _batch(redis: Redis) -> history.Rows:
    rows = history.Rows()
    for _, fields in redis.xrange(keys.HISTORY_OUTBOX):
        rows.add(fields)
    return rows


def _written(url: str, rows: history.Rows) -> int:
    with history.connect(url) as conn:
        history.ensure_partitions(conn, rows.days())
        return rows.write(conn)


def test_a_batch_written_twice_adds_nothing_the_second_time(pg_url: str, redis: Redis) -> None:
    history.upgrade(pg_url)
    store = _store(redis)
    company = str(uuid.uuid4())  # a request of its own shape: its whole JSON in the row
    first = [_message(), Message.create("u-co", str(uuid.uuid4()), "t", None, "acme", company)]
    retried = _message()
    for message in [*first, retried]:
        store.create(message.id, message.to_wire())
        _go(store, message, 1)
    for message in first:
        store.delivered(message.id, _attempt(1, "delivered", 202))
    store.retry(retried.id, "o", _later_ms(), _attempt(1, "retry", 503))
    batch = _batch(redis)
    assert _written(pg_url, batch) == len(first) + 1  # first attempts held in their outcomes
    seen = {m.id: history.lookup(pg_url, m.id) for m in first}
    assert seen[first[1].id] is not None
    assert json.loads(seen[first[1].id]["req"])["company"] == company  # type: ignore[index]
    # The same batch again (its writer died before acknowledging it), then again with a new
    # entry in it: only the new entry's row is added, and the answers do not change.
    assert _written(pg_url, _batch(redis)) == 0
    _go(store, retried, 2)
    store.delivered(retried.id, _attempt(2, "delivered", 200))
    assert _written(pg_url, _batch(redis)) == 2
    assert {m.id: history.lookup(pg_url, m.id) for m in first} == seen
    ids = [m.id for m in [*first, retried]]
    [(attempts, outcomes)] = _rows(
        pg_url,
        "SELECT (SELECT count(*) FROM notify_attempt_log WHERE message_id = ANY(%s)),"
        " (SELECT count(*) FROM notify_outcomes WHERE message_id = ANY(%s))",
        ids,
        ids,
    )
    assert (attempts, outcomes) == (4, 3)
    view = history.lookup(pg_url, retried.id)
    assert view is not None
    assert [a["outcome"] for a in view["attempts"]] == ["retry", "delivered"]


def test_upgrading_a_history_at_version_1_keeps_its_rows_readable(pg_url: str) -> None:
    # A history made before migration 0002, in a schema of its own in the run's database, with
    # a first-attempt delivery written as writers wrote it then: an attempt row and an outcome.
    schema = f"v1_{uuid.uuid4().hex[:8]}"
    url = f"{pg_url}?options=-csearch_path%3D{schema}"
    [(version, name, text)] = history.migrations()[:1]
    with psycopg.connect(pg_url, autocommit=True) as admin:
        admin.execute(f'CREATE SCHEMA "{schema}"'.encode())
    try:
        with history.connect(url) as conn:
            conn.execute(text.encode())
            conn.execute(
                "CREATE TABLE notify_schema (version integer PRIMARY KEY, name text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            )
            conn.execute("INSERT INTO notify_schema (version, name) VALUES (%s, %s)", (1, name))
            conn.commit()
            at = datetime.now(UTC).replace(microsecond=0)
            history.ensure_partitions(conn, {at.date()})
            conn.execute(
                "INSERT INTO notify_attempts VALUES (%s, 'old', 1, 1, 'delivered', 202,"
                " 'http_202', 20, 'cid-old', 'acme', 'expense-approved')",
                (at,),
            )
            conn.execute(
                "INSERT INTO notify_outcomes (finished_at, message_id, seq, state, partner,"
                " template_id, user_id, attempts, http_status, correlation_id, created_at)"
                " VALUES (%s, 'old', 1, 'delivered', 'acme', 'expense-approved', 'u', 1, 202,"
                " 'cid-old', %s)",
                (at + timedelta(milliseconds=25), at - timedelta(seconds=1)),
            )
            conn.commit()
        assert history.schema_version(url) == version == 1
        assert history.upgrade(url) == ["0002_first_attempt.sql"]
        assert history.schema_version(url) == 2
        view = history.lookup(url, "old")
        assert view is not None and view["state"] == "delivered" and view["cid"] == "cid-old"
        assert view["attempts"] == [  # its own row, not also one from the outcome
            {
                "n": 1,
                "at": int(at.timestamp() * 1000),
                "outcome": "delivered",
                "status": 202,
                "cause": "http_202",
                "ms": 20,
                "cid": "cid-old",
            }
        ]
    finally:
        with psycopg.connect(pg_url, autocommit=True) as admin:
            admin.execute(f'DROP SCHEMA "{schema}" CASCADE'.encode())


def test_a_first_attempt_delivery_reads_as_two_rows_did(pg_url: str, redis: Redis) -> None:
    # What lookup answered when the attempt had a row of its own: the same attempt, field for
    # field, from the outcome row that holds it now.
    history.upgrade(pg_url)
    _, message, attempt = _delivered_first_time(redis)
    batch = _batch(redis)
    [outcome] = batch.outcomes
    assert batch.attempts == []
    _written(pg_url, batch)
    view = history.lookup(pg_url, message.id)
    assert view is not None
    held = dict(zip(history.Rows.OUTCOME_COLUMNS, outcome, strict=True))
    assert held["attempt_ms"] == attempt.duration_ms
    assert view["attempts"] == [
        {
            "n": 1,
            "at": attempt.at_ms,
            "outcome": "delivered",
            "status": 202,
            "cause": "http_202",
            "ms": attempt.duration_ms,
            "cid": attempt.correlation_id,
        }
    ]
    assert view["status"] == "202" and view["cid"] == attempt.correlation_id


def test_old_partitions_are_dropped(pg_url: str) -> None:
    history.upgrade(pg_url)
    today = datetime.now(UTC).date()
    old = {today - timedelta(days=n) for n in (40, 31, 30)}
    kept = {today - timedelta(days=n) for n in (29, 1, 0)}
    with history.connect(pg_url) as conn:
        history.ensure_partitions(conn, old | kept)
        dropped = history.prune(conn, 30, today)
        left = set(history.partitions(conn, "notify_attempts"))
    assert {history.partition_name("notify_attempts", d) for d in old} <= set(dropped)
    assert {history.partition_name("notify_outcomes", d) for d in old} <= set(dropped)
    assert {history.partition_name("notify_attempts", d) for d in kept} <= left
    assert not left & {history.partition_name("notify_attempts", d) for d in old}


_WRITER = """
import sys
from redis import Redis
from worker.store.history import HistoryWriter
redis = Redis.from_url(sys.argv[1], decode_responses=True)
writer = HistoryWriter(redis, sys.argv[2], consumer="doomed", batch_size=200, block_ms=10)
print("ready", flush=True)
while True:
    writer.step()
"""


@pytest.mark.slow
def test_a_writer_killed_mid_batch_loses_no_row_and_writes_none_twice(
    pg_url: str, redis: Redis
) -> None:
    history.upgrade(pg_url)
    store = _store(redis)
    total = 6000
    ids = []
    for _ in range(total // 2):  # two entries each: a retry, then the delivery
        message = _message()
        ids.append(message.id)
        store.create(message.id, message.to_wire())
        _go(store, message, 1)
        store.retry(message.id, "o", _later_ms(), _attempt(1, "retry", 503))
        _go(store, message, 2)
        store.delivered(message.id, _attempt(2, "delivered", 200))
    assert redis.xlen(keys.HISTORY_OUTBOX) == total
    url = os.environ["NOTIFY_REDIS_URL"]
    doomed = subprocess.Popen(
        [sys.executable, "-c", _WRITER, url, pg_url],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert doomed.stdout is not None and doomed.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 60
        while redis.xlen(keys.HISTORY_OUTBOX) > total * 0.6 and time.monotonic() < deadline:
            time.sleep(0.01)
        doomed.send_signal(signal.SIGKILL)  # mid-drain: some batches done, one maybe half-way
    finally:
        doomed.kill()
        doomed.wait(10)
    left = redis.xlen(keys.HISTORY_OUTBOX)
    assert 0 < left < total
    # drain() steps until the outbox is empty: it takes over the dead writer's entries once
    # they have been idle 0.2 s, however long that takes here.
    survivor = _writer(redis, pg_url, claim_idle_seconds=0.2, batch_size=500)
    survivor.drain(timeout=60)
    assert redis.xlen(keys.HISTORY_OUTBOX) == 0
    assert redis.xpending(keys.HISTORY_OUTBOX, keys.HISTORY_GROUP)["pending"] == 0
    [(attempts, distinct)] = _rows(
        pg_url,
        "SELECT count(*), count(DISTINCT (message_id, seq)) FROM notify_attempts"
        " WHERE message_id = ANY(%s)",
        ids,
    )
    assert attempts == distinct == total
    [(outcomes, finished)] = _rows(
        pg_url,
        "SELECT count(*), count(DISTINCT message_id) FROM notify_outcomes"
        " WHERE message_id = ANY(%s)",
        ids,
    )
    assert outcomes == finished == total // 2


def test_without_a_history_url_nothing_goes_to_the_outbox(redis: Redis) -> None:
    store = MessageStore(
        redis, publish_grace_seconds=3600, lease_seconds=60, status_ttl_seconds=86400
    )
    message = _message()
    store.create(message.id, message.to_wire())
    _go(store, message, 1)
    store.delivered(message.id, _attempt(1, "delivered", 200))
    assert redis.xlen(keys.HISTORY_OUTBOX) == 0
    assert store.lookup("nosuchmessage") is None


def _children(pid: int) -> list[int]:
    path = f"/proc/{pid}/task/{pid}/children"
    with open(path, encoding="ascii") as children:
        return [int(child) for child in children.read().split()]


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            return cmdline.read().replace(b"\0", b" ").decode()
    except FileNotFoundError:
        return ""


def test_a_worker_writes_its_history_from_a_lower_priority_process_that_ends_with_it(
    start_worker, isolated, api, pg_url: str
):
    """The writer is a process beside the worker (worker/store/history_process.py): it writes
    what the worker delivers, runs at NOTIFY_HISTORY_WRITER_NICE more than the worker, and
    stops once the worker is SIGKILLed (nothing else would stop it)."""
    from tests.harness import wait_for
    from tests.reconcile import requests_for

    env = {**isolated.env, "NOTIFY_API_BASE_URL": api.url, "NOTIFY_HISTORY_URL": pg_url}
    worker = start_worker("history-writer", **env)
    assert worker.process is not None
    pid = worker.process.pid
    wait_for(
        lambda: any("worker.store.history_process" in _cmdline(c) for c in _children(pid)),
        timeout=30,
        what="the worker's history writer",
    )
    (writer,) = [c for c in _children(pid) if "worker.store.history_process" in _cmdline(c)]
    # It lowers its own priority as it starts.
    wait_for(
        lambda: (
            os.getpriority(os.PRIO_PROCESS, writer) == os.getpriority(os.PRIO_PROCESS, pid) + 10
        ),
        timeout=30,
        what="the writer at NOTIFY_HISTORY_WRITER_NICE (10) more than its worker",
    )

    ids = isolated.enqueue_many(requests_for(30, users=3))
    wait_for(
        lambda: (
            _rows(
                pg_url,
                "SELECT count(*) FROM notify_outcomes WHERE message_id = ANY(%s)"
                " AND state = 'delivered'",
                ids,
            )[0][0]
            == len(ids)
        ),
        timeout=60,
        what="30 delivered outcomes in PostgreSQL",
    )

    worker.process.kill()
    worker.process.wait(10)
    wait_for(
        lambda: not os.path.exists(f"/proc/{writer}") or _cmdline(writer) == "",
        timeout=10,
        what="the writer to stop with its worker",
    )
