"""The circuit breaker: when Concur is failing, the whole fleet stops posting, and no message
spends its attempts meanwhile.

States, kept in Redis (``keys.BREAKER``) so every worker sees the same one::

    closed ──(over the window: ≥ min calls, failure share ≥ ratio)──► open
      ▲                                                                 │ open_seconds pass
      │ the probe succeeds                                              ▼
      └──────────────────────────────────────────────────────────── half_open: one probe post
                                      the probe fails: open again, open_seconds doubled (capped)
    forced_open: an operator's ``notify breaker open``; only ``notify breaker close`` ends it

A failure is a transport failure, a 5xx or a 429 (``counts_as_failure``, pure); any other 4xx
means the API is up and counts as a success. Calls and failures are counted in one-second
buckets over ``NOTIFY_BREAKER_WINDOW_SECONDS``.

While the breaker is not closed, a worker that claimed messages posts none of them (but the
one probe of a half-open breaker): they go back on the schedule, due when the breaker may let
posts through again, **without spending an attempt** (``MessageStore.defer``), like a rate-limit
deferral. Each change of state is logged; an opening at ERROR, which Sentry reports. The state
is served as ``notify_breaker_state`` on ``/metrics`` (0 closed, 1 half-open, 2 open) and by
``notify breaker status``.

Every transition is one Lua script timed by Redis' own clock (``TIME``), so worker clocks do not
matter and two workers never both open, probe or close.

One breaker per geolocation (``Breakers``): an outage of one Concur data center pauses the
companies that live there and no other. The default company's geolocation keeps the keys it
always had (``notify:breaker``), named ``default``; every other geolocation a registry company
lives at has its own (``keys.breaker(host)``), named by its ``host[:port]`` and listed in
``keys.BREAKER_GEOLOCATIONS``. The policy is the same for all.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from redis import Redis

from worker.rules.outcomes import ApiResponse, TransportFailure
from worker.settings import Settings
from worker.store import keys

log = logging.getLogger("notify.breaker")

CLOSED, OPEN, HALF_OPEN, FORCED_OPEN = "closed", "open", "half_open", "forced_open"
PROBE, WAIT = "probe", "wait"  # admit's other verdicts: post one; post none, a probe is out
STATE_NUMBERS = {CLOSED: 0, HALF_OPEN: 1, OPEN: 2, FORCED_OPEN: 2}
FORCED_RECHECK_MS = 5_000  # how soon a message paused by a forced-open breaker is looked at again
DEFAULT_GEOLOCATION = "default"  # the name of the default company's geolocation's breaker
_GEOLOCATION_NAME = re.compile(r"[a-z0-9](?:[a-z0-9.-]*[a-z0-9])?(?::[0-9]{1,5})?")

_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

_ADMIT = (
    _NOW
    + """
-- KEYS: breaker ; ARGV: probe lease ms, forced recheck ms
-- Returns {verdict, until ms, changed}: closed | probe | open | wait
local state = redis.call('HGET', KEYS[1], 'state') or 'closed'
if state == 'closed' then return {'closed', 0, 0} end
if state == 'forced_open' then return {'open', now + tonumber(ARGV[2]), 0} end
local changed = 0
if state == 'open' then
  local reopen = tonumber(redis.call('HGET', KEYS[1], 'until') or 0)
  if now < reopen then return {'open', reopen, 0} end
  redis.call('HSET', KEYS[1], 'state', 'half_open', 'changed', now)
  changed = 1
end
local probe = tonumber(redis.call('HGET', KEYS[1], 'probe_until') or 0)
if probe > now then return {'wait', probe, changed} end
redis.call('HSET', KEYS[1], 'probe_until', now + tonumber(ARGV[1]))
return {'probe', 0, changed}
"""
)

_RECORD = (
    _NOW
    + """
-- KEYS: breaker, window, stats
-- ARGV: calls, failures, probe ('' | 'ok' | 'fail'), window s, min calls, failure ratio,
--       open ms, max open ms
-- Returns {transition, open ms, calls, failures}: '' | opened | reopened | closed
local calls, failures = tonumber(ARGV[1]), tonumber(ARGV[2])
local second = math.floor(now / 1000)
local window = tonumber(ARGV[4])
if calls > 0 then redis.call('HINCRBY', KEYS[2], 'c:' .. second, calls) end
if failures > 0 then redis.call('HINCRBY', KEYS[2], 'f:' .. second, failures) end
redis.call('EXPIRE', KEYS[2], 2 * window + 1)
local state = redis.call('HGET', KEYS[1], 'state') or 'closed'
local base = tonumber(ARGV[7])
if ARGV[3] ~= '' and state == 'half_open' then
  if ARGV[3] == 'ok' then
    redis.call('DEL', KEYS[1], KEYS[2])
    return {'closed', 0, 0, 0}
  end
  local open_ms = math.min(2 * tonumber(redis.call('HGET', KEYS[1], 'open_ms') or base),
                           tonumber(ARGV[8]))
  redis.call('HSET', KEYS[1], 'state', 'open', 'until', now + open_ms, 'open_ms', open_ms,
             'changed', now)
  redis.call('HDEL', KEYS[1], 'probe_until')
  redis.call('HINCRBY', KEYS[3], 'breaker_opened', 1)
  return {'reopened', open_ms, 0, 0}
end
if state ~= 'closed' or failures == 0 then return {'', 0, 0, 0} end
local total, failed = 0, 0
local fields = redis.call('HGETALL', KEYS[2])
for i = 1, #fields, 2 do
  local kind, at = string.match(fields[i], '^(%a):(%d+)$')
  at = tonumber(at)
  if at == nil or at <= second - window then
    redis.call('HDEL', KEYS[2], fields[i])
  elseif kind == 'c' then
    total = total + tonumber(fields[i + 1])
  else
    failed = failed + tonumber(fields[i + 1])
  end
end
if total >= tonumber(ARGV[5]) and failed >= tonumber(ARGV[6]) * total then
  redis.call('HSET', KEYS[1], 'state', 'open', 'until', now + base, 'open_ms', base,
             'changed', now)
  redis.call('HINCRBY', KEYS[3], 'breaker_opened', 1)
  return {'opened', base, total, failed}
end
return {'', 0, total, failed}
"""
)


def counts_as_failure(result: ApiResponse | TransportFailure) -> bool:
    """Whether an answer says the API is failing: no answer, a 5xx or a 429 (pure)."""
    if isinstance(result, TransportFailure):
        return True
    return result.status >= 500 or result.status == 429


@dataclass(frozen=True, slots=True)
class BreakerPolicy:
    """When the breaker opens and for how long; built from the ``NOTIFY_BREAKER_*`` settings."""

    enabled: bool = True
    window_seconds: int = 60
    min_calls: int = 20
    failure_ratio: float = 0.5
    open_seconds: float = 30.0
    max_open_seconds: float = 600.0
    probe_lease_seconds: float = 45.0

    @classmethod
    def from_settings(cls, settings: Settings) -> BreakerPolicy:
        """The policy the settings describe; a probe's lease outlasts its longest post."""
        return cls(
            enabled=settings.breaker_enabled,
            window_seconds=settings.breaker_window_seconds,
            min_calls=settings.breaker_min_calls,
            failure_ratio=settings.breaker_failure_ratio,
            open_seconds=settings.breaker_open_seconds,
            max_open_seconds=settings.breaker_max_open_seconds,
            probe_lease_seconds=settings.http_timeout_seconds
            + settings.http_connect_timeout_seconds
            + 5,
        )


@dataclass(frozen=True, slots=True)
class Admission:
    """``admit``'s answer: ``closed`` (post all), ``probe`` (post one), ``open`` or ``wait``
    (post none; ``until_ms`` is when the breaker may let a post through again)."""

    verdict: str
    until_ms: int = 0


@dataclass(frozen=True, slots=True)
class BreakerStatus:
    """What ``notify breaker status`` and ``/metrics`` show."""

    state: str
    until_ms: int | None
    open_seconds: float | None
    calls: int
    failures: int

    @property
    def number(self) -> int:
        """The state as ``notify_breaker_state`` reports it: 0 closed, 1 half-open, 2 open."""
        return STATE_NUMBERS.get(self.state, 0)


def geolocation_name(geolocation: str) -> str:
    """A geolocation's name in keys, metrics and commands: its ``host[:port]`` (pure)."""
    return urlsplit(geolocation).netloc.lower() or geolocation.lower()


class Breaker:
    """One geolocation's breaker in Redis; every method is one round trip (none when disabled).

    ``geolocation``: its name (``geolocation_name``); None for the default company's, on the
    keys it always had.
    """

    def __init__(self, redis: Redis, policy: BreakerPolicy, geolocation: str | None = None) -> None:
        self.redis = redis
        self.policy = policy
        self.geolocation = geolocation
        self.name = geolocation or DEFAULT_GEOLOCATION
        self.key = keys.breaker(geolocation)
        self.window_key = keys.breaker_window(geolocation)
        # Where openings are counted (a webhook endpoint's breaker counts them in its own hash).
        self.stats_key = keys.STATS
        self._admit = redis.register_script(_ADMIT)
        self._record = redis.register_script(_RECORD)

    def admit(self) -> Admission:
        """May a batch post now? Half-open, exactly one caller at a time gets ``probe``."""
        if not self.policy.enabled:
            return Admission(CLOSED)
        verdict, until_ms, changed = self._admit(
            keys=[self.key],
            args=[int(self.policy.probe_lease_seconds * 1000), FORCED_RECHECK_MS],
        )
        if int(changed):
            log.warning(
                "circuit breaker %s half-open: one probe post decides whether it closes",
                self.name,
                extra={"geolocation": self.name},
            )
        return Admission(str(verdict), int(until_ms))

    def record(self, calls: int, failures: int, *, probe: bool | None = None) -> str:
        """Count ``calls`` answers of which ``failures`` failed; ``probe``: the probe's result.

        Returns the transition it caused (``opened``, ``reopened``, ``closed``) or ``""``.
        """
        if not self.policy.enabled or (calls <= 0 and probe is None):
            return ""
        p = self.policy
        transition, open_ms, total, failed = self._record(
            keys=[self.key, self.window_key, self.stats_key],
            args=[
                calls,
                failures,
                "" if probe is None else ("ok" if probe else "fail"),
                p.window_seconds,
                p.min_calls,
                repr(p.failure_ratio),
                int(p.open_seconds * 1000),
                int(p.max_open_seconds * 1000),
            ],
        )
        transition = str(transition)
        if transition == "opened":
            # ERROR: an operational alert, reported to Sentry.
            log.error(
                "circuit breaker %s opened: %s of %s posts failed within %ss; no posts for %.0fs",
                self.name,
                failed,
                total,
                p.window_seconds,
                int(open_ms) / 1000,
                extra={
                    "breaker": OPEN,
                    "geolocation": self.name,
                    "calls": int(total),
                    "failures": int(failed),
                },
            )
        elif transition == "reopened":
            log.warning(
                "circuit breaker %s open again: the probe failed; no posts for %.0fs",
                self.name,
                int(open_ms) / 1000,
                extra={"breaker": OPEN, "geolocation": self.name},
            )
        elif transition == "closed":
            log.warning(
                "circuit breaker %s closed: the probe succeeded",
                self.name,
                extra={"breaker": CLOSED, "geolocation": self.name},
            )
        return transition

    def status(self) -> BreakerStatus:
        """The state now, and the calls and failures counted in the window."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.hgetall(self.key)
        pipe.hgetall(self.window_key)
        pipe.time()
        record, window, (seconds, _micros) = pipe.execute()
        calls = failures = 0
        for name, value in window.items():
            kind, _, at = str(name).partition(":")
            if at.isdigit() and int(at) > int(seconds) - self.policy.window_seconds:
                if kind == "c":
                    calls += int(value)
                elif kind == "f":
                    failures += int(value)
        state = str(record.get("state") or CLOSED)
        until = record.get("until")
        open_ms = record.get("open_ms")
        return BreakerStatus(
            state=state,
            until_ms=int(until) if until and state == OPEN else None,
            open_seconds=int(open_ms) / 1000 if open_ms and state != CLOSED else None,
            calls=calls,
            failures=failures,
        )

    def force_open(self) -> None:
        """An operator's stop: no posts until ``close``."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(self.key, mapping={"state": FORCED_OPEN})
        pipe.hdel(self.key, "until", "probe_until")
        pipe.hincrby(keys.STATS, "breaker_opened", 1)
        pipe.execute()
        log.error(
            "circuit breaker %s forced open by an operator",
            self.name,
            extra={"breaker": FORCED_OPEN, "geolocation": self.name},
        )

    def close(self) -> None:
        """An operator's go: closed, with a fresh window."""
        self.redis.delete(self.key, self.window_key)
        log.warning(
            "circuit breaker %s closed by an operator",
            self.name,
            extra={"breaker": CLOSED, "geolocation": self.name},
        )


class Breakers:
    """The breaker of each geolocation, made on first use (a handful: Concur has a few).

    ``default_geolocation``: where the default company's posts go now (any URL there: its
    host[:port] names it; it may follow a geolocation Concur names); a registry company living
    there shares that breaker.
    """

    def __init__(
        self, redis: Redis, policy: BreakerPolicy, default_geolocation: Callable[[], str]
    ) -> None:
        self.redis = redis
        self.policy = policy
        self.default = Breaker(redis, policy)
        self._default_geolocation = default_geolocation
        self._made: dict[str, Breaker] = {}
        self._lock = threading.Lock()

    def for_geolocation(self, geolocation: str | None) -> Breaker:
        """The breaker of the geolocation at base URL ``geolocation`` (None: the default's)."""
        if geolocation is None:
            return self.default
        name = geolocation_name(geolocation)
        if name == geolocation_name(self._default_geolocation()):
            return self.default
        made = self._made.get(name)
        if made is None:
            with self._lock:
                made = self._made.get(name)
                if made is None:
                    # Listed once per process, so `notify breaker status` and /metrics find it.
                    self.redis.sadd(keys.BREAKER_GEOLOCATIONS, name)
                    made = self._made[name] = Breaker(self.redis, self.policy, name)
        return made

    def named(self, name: str) -> Breaker:
        """The breaker an operator names: ``default`` or a geolocation's ``host[:port]``."""
        if name == DEFAULT_GEOLOCATION:
            return self.default
        name = name.lower()
        if _GEOLOCATION_NAME.fullmatch(name) is None:
            raise ValueError(
                f"{name!r} is not a geolocation: `default`, or a host[:port] such as "
                "emea.api.concursolutions.com (`notify breaker status` lists them)"
            )
        # Listed, so an operator may stop a geolocation before any worker has posted there.
        self.redis.sadd(keys.BREAKER_GEOLOCATIONS, name)
        return Breaker(self.redis, self.policy, name)

    def names(self) -> list[str]:
        """``default`` first, then every geolocation with a breaker of its own, sorted."""
        listed = self.redis.smembers(keys.BREAKER_GEOLOCATIONS)
        names = {v.decode() if isinstance(v, bytes) else str(v) for v in listed}
        return [DEFAULT_GEOLOCATION, *sorted(names - {DEFAULT_GEOLOCATION})]
