"""Compact hot records on the real Redis: what a message costs while it is kept (issue 16, item 1).

A delivered message leaves one key: a listpack-encoded hash of at most 400 bytes (``MEMORY
USAGE``), with its attempts folded in and only what a finished message still needs. Every
reader keeps its shape (``MessageStore.status``).
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from tests.harness import Isolated
from worker.queue.envelopes import Envelope
from worker.settings import Settings
from worker.shapes.models import Message
from worker.store import keys
from worker.store.codec import AttemptRecord, Failure, now_ms
from worker.store.records import MessageStore

BUDGET_BYTES = 400


def _store(runtime: Any) -> MessageStore:
    return MessageStore(
        runtime.redis,
        publish_grace_seconds=3600,
        lease_seconds=60,
        status_ttl_seconds=Settings.model_fields["status_ttl_seconds"].default,
    )


def _typical(partner: str | None = None) -> Message:
    # A Concur-like request: a user id, a UUID session, a template name, a report URL.
    return Message.create(
        f"user-{uuid.uuid4().hex[:12]}",
        str(uuid.uuid4()),
        "expense-approved",
        f"https://app.example.com/reports/{uuid.uuid4().int % 10**6}",
        partner,
    )


def _claim(store: MessageStore, message: Message, gen: int = 1) -> None:
    claim = store.claim(
        Envelope(message.id, gen, message.to_wire()),
        owner="owner-1",
        worker="host-a:4242",
        task_id=str(uuid.uuid4()),
    )
    assert claim.verdict == "go", claim
    assert claim.request == message.to_wire()


def _footprint(runtime: Any, message_id: str) -> tuple[int, str]:
    key = keys.message(message_id)
    return int(runtime.redis.memory_usage(key, samples=0)), str(
        runtime.redis.object("encoding", key)
    )


def _attempt(n: int, outcome: str, status: int | None, cause: str | None = None) -> AttemptRecord:
    return AttemptRecord(
        n, now_ms() - 40, outcome, status, cause or f"http_{status}", 37, str(uuid.uuid4())
    )


def test_a_delivered_message_is_one_listpack_hash_within_400_bytes_kept_24_hours(
    isolated: Isolated,
) -> None:
    runtime = isolated.runtime  # a database of its own: the session worker must not take these
    store = _store(runtime)
    for partner in (None, "acme"):
        message = _typical(partner)
        assert store.create(message.id, message.to_wire()) == (True, "queued")
        _claim(store, message)
        attempt = _attempt(1, "delivered", 202)
        assert store.delivered(message.id, attempt)
        size, encoding = _footprint(runtime, message.id)
        assert encoding == "listpack", runtime.redis.hgetall(keys.message(message.id))
        assert size <= BUDGET_BYTES, (size, runtime.redis.hgetall(keys.message(message.id)))
        assert not runtime.redis.exists(keys.attempts(message.id))
        assert 86000 < runtime.redis.ttl(keys.message(message.id)) <= 86400
        # Every value under Redis's listpack limit.
        stored = runtime.redis.hgetall(keys.message(message.id))
        assert max(len(str(value).encode()) for value in stored.values()) <= 64
        record = store.status(message.id)
        assert record is not None
        assert record["state"] == "delivered"
        assert json.loads(record["req"]) == message.to_wire()
        assert record["partner"] == (partner or "default")
        assert record["status"] == "202" and record["cid"] == attempt.correlation_id
        assert record["attempt"] == "1"
        assert record["attempts"] == [json.loads(attempt.to_json())]


def test_a_retried_then_delivered_message_stays_compact_and_keeps_every_attempt(
    isolated: Isolated,
) -> None:
    runtime = isolated.runtime  # a database of its own: the session worker must not take these
    store = _store(runtime)
    message = _typical()
    store.create(message.id, message.to_wire())
    attempts = []
    for n, gen in ((1, 1), (2, 2)):
        _claim(store, message, gen)
        attempts.append(_attempt(n, "retry", 503))
        assert store.retry(message.id, "owner-1", now_ms(), attempts[-1])
        record = store.status(message.id)
        assert record is not None and record["state"] == "retrying"
        assert record["cid"] == attempts[-1].correlation_id and record["status"] == "503"
    _claim(store, message, 3)
    attempts.append(_attempt(3, "delivered", 200))
    assert store.delivered(message.id, attempts[-1])
    size, encoding = _footprint(runtime, message.id)
    assert encoding == "listpack" and size <= 512, size
    record = store.status(message.id)
    assert record is not None
    assert record["attempts"] == [json.loads(a.to_json()) for a in attempts]
    assert record["attempt"] == "3"


def test_a_timeout_and_a_deferral_keep_their_causes(isolated: Isolated) -> None:
    runtime = isolated.runtime  # a database of its own: the session worker must not take these
    store = _store(runtime)
    message = _typical()
    store.create(message.id, message.to_wire())
    _claim(store, message)
    deferred = AttemptRecord(1, now_ms(), "deferred", None, "token_unavailable", 3, None)
    assert store.defer(message.id, "owner-1", now_ms(), deferred)
    _claim(store, message, 2)
    timeout = AttemptRecord(1, now_ms(), "retry", None, "timeout", 30000, None)
    assert store.retry(message.id, "owner-1", now_ms(), timeout)
    record = store.status(message.id)
    assert record is not None
    assert record["attempts"] == [json.loads(deferred.to_json()), json.loads(timeout.to_json())]


def test_dead_letters_and_replays_read_the_compact_record(isolated: Isolated) -> None:
    runtime = isolated.runtime  # a database of its own: the session worker must not take these
    store = _store(runtime)
    message = _typical("acme")
    store.create(message.id, message.to_wire())
    _claim(store, message)
    attempt = _attempt(1, "dead", 400)
    failure = Failure("http_400", "bad request", 400, [{"errorCode": "x"}], attempt.correlation_id)
    assert store.dead_letter(message.id, failure, owner="owner-1", attempt=attempt)
    letter = runtime.deadletters.get(message.id)
    assert letter is not None and letter.request == message.to_wire()
    assert letter.partner == "acme" and letter.attempts == 1 and letter.status == 400
    assert letter.correlation_id == attempt.correlation_id and letter.first_attempt_ms
    record = store.status(message.id)
    assert record is not None and record["state"] == "failed" and record["reason"] == "http_400"
    assert runtime.redis.ttl(keys.message(message.id)) == -1  # kept until handled
    envelope = store.replay(message.id)
    assert envelope is not None and envelope.request == message.to_wire()
    _claim(store, message, envelope.gen)
    assert store.delivered(message.id, _attempt(1, "delivered", 200))
    record = store.status(message.id)
    assert record is not None and record["replays"] == "1"
    assert [a["outcome"] for a in record["attempts"]] == ["dead", "delivered"]


def test_a_request_of_another_shape_is_kept_as_it_came(isolated: Isolated) -> None:
    runtime = isolated.runtime  # a database of its own: the session worker must not take these
    store = _store(runtime)
    request = {"userId": "u", "sessionId": "s", "templateId": "t", "context": {}, "extra": 1}
    message_id = f"odd-{uuid.uuid4().hex[:8]}"
    store.create(message_id, request)
    claim = store.claim(Envelope(message_id, 1, request), owner="o", worker="w", task_id="t")
    assert claim.request == request
    record = store.status(message_id)
    assert record is not None and json.loads(record["req"]) == request


def test_a_record_written_before_the_compact_form_is_still_read(isolated: Isolated) -> None:
    runtime = isolated.runtime  # a database of its own: the session worker must not take these
    # The stored shape of earlier releases: the request as JSON, the attempts in a list.
    store = _store(runtime)
    message = _typical()
    key = keys.message(message.id)
    entry = _attempt(1, "retry", 503)
    runtime.redis.hset(
        key,
        mapping={
            "req": json.dumps(message.to_wire()),
            "state": "inflight",
            "gen": 2,
            "attempt": 2,
            "created": now_ms(),
            "updated": now_ms(),
            "replays": 0,
            "partner": "default",
            "owner": "owner-1",
            "lease": now_ms() + 60000,
        },
    )
    runtime.redis.rpush(keys.attempts(message.id), entry.to_json())
    assert store.delivered(message.id, _attempt(2, "delivered", 200))
    record = store.status(message.id)
    assert record is not None and json.loads(record["req"]) == message.to_wire()
    assert [a["outcome"] for a in record["attempts"]] == ["retry", "delivered"]
    assert 0 < runtime.redis.ttl(keys.attempts(message.id)) <= 86400
