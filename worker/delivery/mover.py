"""The mover: publishes messages whose next attempt is due (retries, and lost tasks).

Each worker process runs one in a thread; the ``due`` script is atomic, so any number of movers
share the schedule without publishing a message twice in one grace period (and a second copy
would be fenced off by ``claim`` anyway). It publishes through the process's ``Publisher``, which
keeps a batch the broker did not take and tries again within seconds; meanwhile the mover takes
nothing more from the schedule.

Each worker process also runs a ``Liveness`` thread, which keeps these promises:

* **A dead worker's messages come back in seconds, not after the visibility timeout.** Every
  worker writes a heartbeat (``keys.WORKERS``) every ``HEARTBEAT_SECONDS`` and lists the ids of the
  messages in the tasks it has received, prefetched or running (``keys.held``), until each task
  ends. A worker whose heartbeat is older than ``DEAD_AFTER_SECONDS`` is taken over by the first
  live one to notice: its held messages that are waiting (queued, or due) are put at the head of
  the schedule, so the mover publishes them at once; its in-flight ones too, their lease cut
  short, when none of its Redis connections remains (a killed process's sockets close with it).
  A worker that is alive but cut off from Redis keeps its connections open on the server's side,
  so its in-flight messages wait for their lease as before: a post it may still be making is not
  made twice. Extra copies of a message are fenced off by ``claim`` (generation, lease, state).
* **Nor does a task it popped and had not yet noted.** kombu's Redis transport pops a task
  (``BRPOP``) and notes it as unacknowledged in a second round trip; a worker killed between the
  two leaves the task's messages in no list and no held set, and only the publish grace (an hour)
  would bring them back. A takeover therefore opens an audit (``keys.ORPHAN_AUDIT``): every
  heartbeat, while it is open, the messages waiting but published before the oldest task still on
  the queue (its ``PUBLISHED_MS_HEADER``, less ``ORPHAN_MARGIN_SECONDS``) and held by no live
  worker are put at the head of the schedule (``MessageStore.publish_orphans``); the audit ends
  once the queue has moved past the takeover. Redis brokers only: RabbitMQ hands a dead
  consumer's unacknowledged messages to another itself.
* **A dead worker's figure of posts in flight goes with it** (``keys.POSTS_IN_FLIGHT``, written
  by ``worker.limits.inflight.InFlightGauge``), so ``/metrics`` sums the live ones.
* **Only a worker that has itself been heartbeating for ``DEAD_AFTER_SECONDS`` judges others**, so
  after a Redis outage nobody mistakes the whole fleet for dead.
* **A failover or restart of Redis loses no published message.** Replication is asynchronous,
  so the newest writes of a master that dies (or of an AOF not yet synced) may be missing from
  its successor: a task pushed onto the queue among them would leave its message to wait for the
  grace period. ``keys.SERVER`` holds the Redis run id and when a mover last saw it; when a mover
  finds another run id there, it puts every message published since shortly before that sighting
  back at the head of the schedule.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from worker.ops.background import Loop
from worker.queue.envelopes import published_ms_of
from worker.queue.publisher import Publisher
from worker.store import keys
from worker.store.codec import now_ms
from worker.store.records import MessageStore

log = logging.getLogger("notify.mover")


class BrokerAway(Exception):
    """The publisher still holds due messages it could not put on the queue."""

    def __init__(self, count: int) -> None:
        super().__init__(
            f"{count} due messages are waiting for the broker (the publisher holds them)"
        )


BATCH = 500
MAX_PAUSE_SECONDS = 10.0
# How long the mover waits for the publisher to put a batch on the queue before backing off.
FLUSH_SECONDS = 5.0

HEARTBEAT_SECONDS = 2.0
DEAD_AFTER_SECONDS = 15.0
# How far before the last sighting of the old Redis a failover's lost writes may reach.
RESCUE_MARGIN_SECONDS = 10.0
# How much older than the oldest task on the queue a message must be to count as passed by it:
# publishers' clocks differ, and a publisher may put a batch on the queue after a newer one.
ORPHAN_MARGIN_SECONDS = 5.0
# How long one heartbeat spends on an orphan audit's pass, in chunks, before leaving the rest.
ORPHAN_PASS_SECONDS = 0.5

_REAP = """
-- KEYS: workers, held set, schedule, posts in flight, orphan audit
-- ARGV: worker, dead before ms, now ms, record key prefix, in-flight too ('1' or '0'),
--       open the orphan audit ('1' or '0')
local seen = redis.call('ZSCORE', KEYS[1], ARGV[1])
if seen and tonumber(seen) >= tonumber(ARGV[2]) then return -1 end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[4], ARGV[1])
local now = tonumber(ARGV[3])
if ARGV[6] == '1' then
  -- Looked at again from the start (a pass under way starts over), until the queue has moved
  -- past now.
  redis.call('HSET', KEYS[5], 'from', 0)
  redis.call('HDEL', KEYS[5], 'to', 'at')
  if now > tonumber(redis.call('HGET', KEYS[5], 'until') or 0) then
    redis.call('HSET', KEYS[5], 'until', now)
  end
end
local taken = 0
for _, id in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  local record = ARGV[4] .. id
  local r = redis.call('HMGET', record, 'state', 'worker', 'next', 'lease')
  local take = r[1] == 'queued' or (r[1] == 'retrying' and tonumber(r[3] or 0) <= now)
  if r[1] == 'inflight' and r[2] == ARGV[1] and ARGV[5] == '1' then
    if tonumber(r[4] or 0) > now then redis.call('HSET', record, 'lease', now) end
    take = true
  end
  if take then
    local score = redis.call('ZSCORE', KEYS[3], id)
    if (not score) or tonumber(score) > now then redis.call('ZADD', KEYS[3], now, id) end
    taken = taken + 1
  end
end
redis.call('DEL', KEYS[2])
return taken
"""

_RESCUE = """
-- KEYS: server, schedule ; ARGV: run id, now ms, margin ms, grace ms, record key prefix
local r = redis.call('HMGET', KEYS[1], 'run', 'seen')
redis.call('HSET', KEYS[1], 'run', ARGV[1], 'seen', ARGV[2])
if (not r[1]) or r[1] == ARGV[1] then return -1 end
-- Published (by create or by the mover) since shortly before the old server was last seen:
-- scheduled a grace period after that.
local now = tonumber(ARGV[2])
local since = tonumber(r[2] or 0) - tonumber(ARGV[3]) + tonumber(ARGV[4])
local rescued = 0
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[2], since, '+inf')) do
  local m = redis.call('HMGET', ARGV[5] .. id, 'state', 'next')
  if m[1] == 'queued' or (m[1] == 'retrying' and tonumber(m[2] or 0) <= now) then
    redis.call('ZADD', KEYS[2], now, id)
    rescued = rescued + 1
  end
end
return rescued
"""


class Mover(Loop):
    """Moves due messages from the schedule to the queue, every ``interval_seconds``."""

    def __init__(self, store: MessageStore, publisher: Publisher, interval_seconds: float) -> None:
        self.store = store
        self.publisher = publisher
        self.interval_seconds = interval_seconds
        self._pause = interval_seconds
        super().__init__("notify-mover")

    def run_once(self) -> int:
        """Publish every message due now; returns how many were published.

        Raises ``BrokerAway`` when the publisher could not put a batch on the queue in time: the
        publisher keeps it and tries again, and the mover takes nothing more from the schedule
        until it has gone out.
        """
        moved = 0
        while True:
            batch = self.store.due(BATCH)
            if batch:
                self.publisher.submit(batch)
                if not self.publisher.flush(FLUSH_SECONDS):
                    raise BrokerAway(len(batch))
            moved += len(batch)
            if len(batch) < BATCH:
                return moved

    def _step(self) -> float:
        try:
            moved = self.run_once()
            if moved:
                log.info("mover published %d due messages", moved)
            self._pause = self.interval_seconds
        except (RedisConnectionError, RedisTimeoutError) as error:
            # An outage is expected to pass: one short line per try, trying less often.
            log.warning("mover: Redis unavailable (%s); next try in %.1fs", error, self._pause)
            self._pause = min(self._pause * 2, MAX_PAUSE_SECONDS)
        except BrokerAway as error:
            log.warning("mover: %s; next try in %.1fs", error, self._pause)
            self._pause = min(self._pause * 2, MAX_PAUSE_SECONDS)
        except Exception:  # a bug: the thread goes on
            log.exception("mover tick failed")
        return self._pause


class Liveness(Loop):
    """One worker's heartbeat and held messages, and the taking over of dead workers' messages."""

    def __init__(
        self,
        redis: Redis,
        worker: str,
        *,
        grace_ms: int,
        store: MessageStore | None = None,
        oldest_task: Callable[[], str | bytes | None] | None = None,
        heartbeat_seconds: float = HEARTBEAT_SECONDS,
        dead_after_seconds: float = DEAD_AFTER_SECONDS,
        orphan_margin_seconds: float = ORPHAN_MARGIN_SECONDS,
    ) -> None:
        self.redis = redis
        self.worker = worker
        self.grace_ms = grace_ms
        # The orphan audit's store, and what reads the oldest send task on the broker's Redis
        # list as stored there (None: no audit, as on RabbitMQ).
        self.store = store
        self.oldest_task = oldest_task
        self.orphan_margin_ms = int(orphan_margin_seconds * 1000)
        self.heartbeat_seconds = heartbeat_seconds
        self.dead_after_ms = int(dead_after_seconds * 1000)
        self._reap = redis.register_script(_REAP)
        self._rescue = redis.register_script(_RESCUE)
        self._healthy_since: float | None = None
        super().__init__("notify-liveness")
        self._warned = 0.0

    # -- the held messages (called from Celery's signals) --

    def hold(self, ids: Iterable[str]) -> None:
        """Note the messages of a task this worker received (prefetched or about to run)."""
        self._change("sadd", ids)

    def release(self, ids: Iterable[str]) -> None:
        """Forget the messages of a task that ended (each has its outcome written)."""
        self._change("srem", ids)

    def _change(self, command: str, ids: Iterable[str]) -> None:
        members = list(ids)
        if not members:
            return
        try:
            getattr(self.redis, command)(keys.held(self.worker), *members)
        except RedisError as error:
            # Not fatal: these messages then come back after the visibility timeout or lease.
            if time.monotonic() - self._warned > 10:
                self._warned = time.monotonic()
                log.warning("liveness: cannot note held messages (%s)", error)

    # -- the thread --

    def tick(self) -> int:
        """Heartbeat, check for a failover, take over dead workers; returns messages taken."""
        now = now_ms()
        self.redis.zadd(keys.WORKERS, {self.worker: now})
        run_id = str(self.redis.info("server").get("run_id", ""))
        rescued = int(
            self._rescue(
                keys=[keys.SERVER, keys.SCHEDULE],
                args=[
                    run_id,
                    now,
                    int(RESCUE_MARGIN_SECONDS * 1000),
                    self.grace_ms,
                    keys.message(""),
                ],
            )
        )
        if rescued > 0:
            log.warning(
                "Redis changed (failover or restart): %d messages published shortly before are "
                "published again (extra copies are refused by claim)",
                rescued,
            )
        if self._healthy_since is None:
            self._healthy_since = time.monotonic()
        if (time.monotonic() - self._healthy_since) * 1000 < self.dead_after_ms:
            return 0
        taken = 0
        dead_before = now - self.dead_after_ms
        for worker in self.redis.zrangebyscore(keys.WORKERS, "-inf", f"({dead_before}"):
            name = str(worker)
            if name == self.worker:
                continue
            connected = self._connected(name)
            count = int(
                self._reap(
                    keys=[
                        keys.WORKERS,
                        keys.held(name),
                        keys.SCHEDULE,
                        keys.POSTS_IN_FLIGHT,
                        keys.ORPHAN_AUDIT,
                    ],
                    args=[
                        name,
                        dead_before,
                        now,
                        keys.message(""),
                        "0" if connected else "1",
                        "1" if self._audits else "0",
                    ],
                )
            )
            if count >= 0:
                taken += count
                log.warning(
                    "worker %s stopped answering %.0fs ago; %d of its messages are published "
                    "again%s",
                    name,
                    self.dead_after_ms / 1000,
                    count,
                    " (its connections remain, so in-flight ones wait for their lease)"
                    if connected
                    else "",
                )
        if self._audits:
            taken += self.audit_orphans(live_since_ms=dead_before)
        return taken

    @property
    def _audits(self) -> bool:
        return self.store is not None and self.oldest_task is not None

    def audit_orphans(self, *, live_since_ms: int) -> int:
        """If a takeover opened the orphan audit, publish again the messages the queue has moved
        past that no live worker holds; returns how many (0 when no audit is open, or when the
        oldest task on the queue does not say when it was published).
        """
        if self.store is None or self.oldest_task is None:
            return 0
        if not self.redis.exists(keys.ORPHAN_AUDIT):
            return 0
        oldest = self.oldest_task()
        if oldest is None:
            passed = now_ms()  # an empty queue has moved past everything published
        else:
            published = published_ms_of(oldest)
            if published is None:
                return 0
            passed = published
        # A pass over a large schedule goes in chunks (Redis does nothing else while a script
        # runs); as many as fit in half a second now, the rest at the next heartbeat.
        found = 0
        started = time.monotonic()
        while True:
            chunk_found, more = self.store.publish_orphans(
                cutoff_ms=passed - self.orphan_margin_ms, live_since_ms=live_since_ms
            )
            found += max(chunk_found, 0)
            if not more or time.monotonic() - started > ORPHAN_PASS_SECONDS:
                break
        if found > 0:
            log.warning(
                "%d messages a dead worker had taken off the queue without noting them are "
                "published again (extra copies are refused by claim)",
                found,
            )
        return found

    def _connected(self, worker: str) -> bool:
        name = f"notify:{worker}"
        return any(client.get("name") == name for client in self.redis.client_list())

    def _step(self) -> float:
        try:
            self.tick()
        except RedisError as error:
            self._healthy_since = None
            log.warning("liveness: Redis unavailable (%s)", error)
        except Exception:
            self._healthy_since = None
            log.exception("liveness tick failed")
        return self.heartbeat_seconds

    def stop(self, timeout_seconds: float = 10.0) -> None:
        """Stop the thread; a clean exit leaves nothing held (the broker hands tasks back)."""
        super().stop(timeout_seconds)
        try:
            pipe = self.redis.pipeline(transaction=False)
            pipe.zrem(keys.WORKERS, self.worker)
            pipe.hdel(keys.POSTS_IN_FLIGHT, self.worker)
            pipe.delete(keys.held(self.worker))
            pipe.execute()
        except RedisError as error:
            log.warning("liveness: could not sign off (%s)", error)
