"""One rule for a Redis outage: commands wait it out for the policy's time, then fail clearly."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from sandbox.redisserver import EmbeddedRedis, free_port
from worker.queue.envelopes import Envelope
from worker.rules.retries import ANSWERING, RedisPatience
from worker.store.codec import AttemptRecord
from worker.store.records import MessageStore
from worker.store.redisclient import make_redis


@pytest.fixture
def own_redis() -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(port=free_port())
    server.start()
    yield server
    server.stop()


def test_the_pauses_double_from_the_first_and_stop_at_the_cap() -> None:
    patience = RedisPatience(seconds=10, first_pause_seconds=0.05, max_pause_seconds=1.0)
    assert [patience.pause_seconds(n) for n in range(1, 7)] == [0.05, 0.1, 0.2, 0.4, 0.8, 1.0]
    assert patience.pause_seconds(500) == 1.0


def test_another_try_is_made_only_while_it_fits_in_the_patience() -> None:
    patience = RedisPatience(seconds=2, first_pause_seconds=0.5, max_pause_seconds=1.0)
    assert patience.may_try_again(waited_seconds=0.0, failures=1)
    assert patience.may_try_again(waited_seconds=1.0, failures=2)  # 1.0 + 1.0 == 2
    assert not patience.may_try_again(waited_seconds=1.5, failures=2)


def test_a_command_waits_out_a_redis_restart_and_is_answered(own_redis: EmbeddedRedis) -> None:
    client = make_redis(own_redis.url, patience=RedisPatience(seconds=20))
    client.set("kept", "yes")
    restarted = threading.Thread(target=own_redis.restart, kwargs={"down_seconds": 5.0})
    restarted.start()
    time.sleep(0.3)  # the server is away now
    try:
        assert client.get("kept") == "yes"  # the AOF brought it back; the command waited
    finally:
        restarted.join()
        client.close()


def test_an_outcome_written_during_a_restart_lands_once(own_redis: EmbeddedRedis) -> None:
    # The outcome scripts have no loop of their own any more: the client's patience covers them
    # (5 s away: longer than redis-py's own default retries wait, about 4 s).
    client = make_redis(own_redis.url, patience=RedisPatience(seconds=20))
    store = MessageStore(client, publish_grace_seconds=60, lease_seconds=60, status_ttl_seconds=60)
    request = {"userId": "u", "sessionId": "s", "templateId": "welcome", "context": {}}
    store.create("m1", request)
    claim = store.claim(Envelope("m1", 1, request), owner="me", worker="w", task_id="t")
    assert claim.verdict == "go"
    restarted = threading.Thread(target=own_redis.restart, kwargs={"down_seconds": 5.0})
    restarted.start()
    time.sleep(0.3)
    try:
        attempt = AttemptRecord(1, int(time.time() * 1000), "delivered", 200, "", 250, None)
        assert store.delivered("m1", attempt)
    finally:
        restarted.join()
    assert store.status("m1")["state"] == "delivered"
    client.close()


def test_where_someone_waits_a_dead_redis_is_reported_within_seconds() -> None:
    client = make_redis(f"redis://127.0.0.1:{free_port()}/0", patience=ANSWERING)
    started = time.monotonic()
    with pytest.raises(RedisConnectionError):
        client.ping()
    waited = time.monotonic() - started
    # It did wait (a restart takes a second or two), and gave up near its 2 s, not minutes on.
    assert 1.0 <= waited <= ANSWERING.seconds + 3
