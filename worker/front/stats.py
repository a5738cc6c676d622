"""Counts an operator needs without Flower: backlog, retries, dead letters, deliveries.

``collect(runtime)`` reads everything in one pipelined round trip and ``build`` (pure) turns the
raw replies into a ``Stats``; ``render_prometheus`` renders it in the Prometheus text format for
``/metrics``, and ``notify stats`` prints it.

Where each number comes from, and what it costs:

* ``queued``: the Celery queue's length in the broker (``LLEN`` of the queue's list and of its
  priority sub-lists). Messages a worker has already prefetched are not in it; they are
  ``reserved`` (kombu's ``unacked`` hash, ``HLEN``: every queue on this Redis database).
* ``waiting_in_lanes``: new messages in the lanes (``NOTIFY_DISPATCH=fair``), not yet handed
  to the queue by a dispatcher; a gauge in ``keys.LIVE`` (``laned``) like the next ones.
* ``inflight``, ``retry_waiting`` and ``dead_letters`` by reason: gauges in ``keys.LIVE`` that
  the Lua scripts of ``worker/store/lua/`` change in the same atomic step as the message's
  state, so reading them is O(1) and exact, rather than a scan of the schedule or the dead-letter
  index (O(n) per scrape). ``retry_waiting`` includes messages the rate limit put back. Only
  records written by this version are counted: records from before it (an upgrade with messages
  waiting) are not, which is why a gauge is shown as 0 rather than negative while they drain.
  ``dead_letters_total`` is the index's ``ZCARD``, exact whatever happened before.
* ``delivered_per_minute``: the per-minute counters the delivery script increments (kept two
  hours), oldest first, the last one being the current, partial minute.
* ``totals``: cumulative counters since the database was created (``keys.STATS``).
* ``companies``: registry companies by state (``connected``, ``needs_reconnect``,
  ``disconnected``), read from each company's hash: O(companies), exact.
* ``waiting_by_company``: the ``TOP_COMPANIES`` companies with the most messages not finished
  yet (``default`` among them), from the sorted set ``keys.COMPANY_WAITING`` the scripts keep
  (O(log companies)); for ``notify stats`` only: no metric has a label per company.
* ``partners``: the same cumulative counters by partner (``keys.partner_stats``), kept by the
  same scripts from the record's partner; ``collect(partner=...)`` shows one partner's as the
  totals (the queue and gauges stay fleet-wide: the broker does not know partners).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from kombu.transport.redis import PRIORITY_STEPS, Channel
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

from worker.limits.breaker import DEFAULT_GEOLOCATION, STATE_NUMBERS
from worker.rules import outcomes
from worker.runtime import Runtime
from worker.shapes.models import COMPANY_STATES, is_partner_name
from worker.store import keys
from worker.store.codec import now_ms
from worker.store.companies import CompanyRegistry
from worker.store.records import DELIVERED_COUNTER_TTL_SECONDS

DEFAULT_MINUTES = 15
TOP_COMPANIES = 5  # companies `notify stats` lists by messages waiting
MAX_MINUTES = DELIVERED_COUNTER_TTL_SECONDS // 60
# The text format generate_latest writes (CONTENT_TYPE_LATEST names a newer one now).
PROMETHEUS_CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4

# Cumulative counters in ``keys.STATS`` (besides ``dead:<reason>``), as (field, metric, help).
_COUNTERS = (
    ("delivered", "notify_delivered_total", "Messages the API accepted (2xx)."),
    (
        "retried",
        "notify_retries_total",
        "Attempts that failed for a passing reason and were scheduled again.",
    ),
    (
        "deferred",
        "notify_rate_limit_deferred_total",
        "Messages put back on the schedule without spending an attempt: no rate-limit permit "
        "in time, no token, or the circuit breaker held the posts.",
    ),
    (
        "breaker_opened",
        "notify_breaker_opened_total",
        "Times the circuit breaker opened (failures, failed probes, or an operator).",
    ),
    ("replayed", "notify_replayed_total", "Dead letters sent back through the pipeline."),
    (
        "cancelled",
        "notify_cancelled_total",
        "Messages cancelled before they were posted (DELETE /messages/{id}, notify cancel).",
    ),
    (
        "geolocation_refused",
        "notify_oauth_geolocation_refused_total",
        "Geolocations named by Concur's token endpoint that were not followed "
        "(not https on a Concur host nor listed in NOTIFY_OAUTH_EXTRA_GEOLOCATION_HOSTS).",
    ),
)


@dataclass(frozen=True, slots=True)
class MinuteCount:
    """Deliveries in one wall-clock minute."""

    minute_start_ms: int
    delivered: int


@dataclass(frozen=True, slots=True)
class Stats:
    """A snapshot of the counts, taken at ``at_ms``."""

    at_ms: int
    queue: str
    queued: int
    reserved: int
    inflight: int
    retry_waiting: int
    dead_letters_total: int
    dead_letters: Mapping[str, int]
    delivered_per_minute: Sequence[MinuteCount]
    totals: Mapping[str, int]
    dead_lettered_total: Mapping[str, int] = field(default_factory=dict)
    rate_limit_penalty_factor: float = 1.0
    breaker_state: str = "closed"  # the default company's geolocation's breaker
    # geolocation (``default``, or a host[:port]) -> its breaker's state
    breakers: Mapping[str, str] = field(default_factory=dict)
    # partner -> its cumulative counters (the fields of ``totals``, and ``dead:<reason>``)
    partners: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    # Messages waiting in the lanes for the dispatcher (NOTIFY_DISPATCH=fair), all companies.
    waiting_in_lanes: int = 0
    partner: str | None = None  # set: ``totals`` and ``dead_lettered_total`` are this partner's
    # state -> how many registry companies are in it (every state, zeros included)
    companies: Mapping[str, int] = field(default_factory=dict)
    # company -> messages not finished yet, the companies with the most first (a few)
    waiting_by_company: Mapping[str, int] = field(default_factory=dict)
    # Posts in flight (NOTIFY_MAX_IN_FLIGHT): all worker processes together, and the most of any
    # one, which is what a SIGKILL of it may cost in double posts.
    posts_in_flight: int = 0
    posts_in_flight_most: int = 0

    @property
    def delivered_last_minute(self) -> int:
        """Deliveries in the last complete minute (0 when fewer than two minutes are kept)."""
        if len(self.delivered_per_minute) < 2:
            return 0
        return self.delivered_per_minute[-2].delivered

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (snake_case keys), as ``notify stats --json`` prints it."""
        data = asdict(self)
        data["dead_letters"] = dict(self.dead_letters)
        data["dead_lettered_total"] = dict(self.dead_lettered_total)
        data["totals"] = dict(self.totals)
        data["partners"] = {name: dict(counts) for name, counts in self.partners.items()}
        data["companies"] = dict(self.companies)
        data["waiting_by_company"] = dict(self.waiting_by_company)
        data["breakers"] = dict(self.breakers)
        data["delivered_last_minute"] = self.delivered_last_minute
        return data


def queue_lists(queue: str) -> list[str]:
    """The Redis lists kombu keeps one queue in: the queue itself and its priority sub-lists."""
    return [queue] + [f"{queue}{Channel.sep}{step}" for step in PRIORITY_STEPS if step]


def _int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def _float(value: Any, default: float) -> float:
    try:
        parsed = float(value)
    except (TypeError, ValueError):
        return default
    return parsed if math.isfinite(parsed) else default


def build(
    *,
    at_ms: int,
    queue: str,
    queue_lengths: Sequence[Any],
    reserved: Any,
    live: Mapping[str, str],
    totals: Mapping[str, str],
    dead_index_size: Any,
    minute_counts: Sequence[tuple[int, Any]],
    penalty: Any,
    breaker_state: Any = None,
    breakers: Mapping[str, Any] | None = None,
    partners: Mapping[str, Mapping[str, str]] | None = None,
    partner: str | None = None,
    companies: Mapping[str, int] | None = None,
    waiting_by_company: Sequence[tuple[Any, Any]] = (),
    posts_in_flight: Mapping[Any, Any] | None = None,
) -> Stats:
    """Turn the raw Redis replies into ``Stats`` (pure).

    With ``partner``, ``totals`` must be that partner's counters (``keys.partner_stats``).
    """
    dead_now = {reason: 0 for reason in outcomes.REASONS}
    dead_ever = {reason: 0 for reason in outcomes.REASONS}
    for name, value in live.items():
        if name.startswith("dead:"):
            dead_now[name.removeprefix("dead:")] = max(0, _int(value))
    plain: dict[str, int] = {name: 0 for name, _, _ in _COUNTERS}
    for name, value in totals.items():
        if name.startswith("dead:"):
            dead_ever[name.removeprefix("dead:")] = _int(value)
        else:
            plain[name] = _int(value)
    plain["dead_lettered"] = sum(dead_ever.values())
    per_process = [max(0, _int(value)) for value in (posts_in_flight or {}).values()]
    return Stats(
        at_ms=at_ms,
        queue=queue,
        queued=sum(_int(length) for length in queue_lengths),
        reserved=_int(reserved),
        inflight=max(0, _int(live.get("inflight"))),
        retry_waiting=max(0, _int(live.get("retrying"))),
        waiting_in_lanes=max(0, _int(live.get("laned"))),
        dead_letters_total=_int(dead_index_size),
        dead_letters=dead_now,
        delivered_per_minute=tuple(
            MinuteCount(minute * 60_000, _int(count)) for minute, count in minute_counts
        ),
        totals=plain,
        dead_lettered_total=dead_ever,
        rate_limit_penalty_factor=max(1.0, _float(penalty, 1.0)),
        breaker_state=str(breaker_state or "closed"),
        breakers={
            DEFAULT_GEOLOCATION: str(breaker_state or "closed"),
            **{name: str(state or "closed") for name, state in (breakers or {}).items()},
        },
        partners={
            name: {field_name: _int(value) for field_name, value in counts.items()}
            for name, counts in sorted((partners or {}).items())
        },
        partner=partner,
        companies={**dict.fromkeys(COMPANY_STATES, 0), **(companies or {})},
        waiting_by_company={
            str(company): count
            for company, count in ((name, _int(score)) for name, score in waiting_by_company)
            if count > 0
        },
        posts_in_flight=sum(per_process),
        posts_in_flight_most=max(per_process, default=0),
    )


def collect(
    runtime: Runtime, *, minutes: int = DEFAULT_MINUTES, partner: str | None = None
) -> Stats:
    """Read every count in two pipelined round trips; ``minutes`` of per-minute deliveries.

    ``partner``: the cumulative totals are that partner's (see ``Stats.partner``).
    """
    minutes = max(1, min(minutes, MAX_MINUTES))
    at = now_ms()
    current = at // 60_000
    minute_numbers = list(range(current - minutes + 1, current + 1))
    queue = runtime.settings.queue_name
    lists = queue_lists(queue)
    pipe = runtime.redis.pipeline(transaction=False)
    for name in lists:
        pipe.llen(name)
    pipe.hlen(Channel.unacked_key)
    pipe.hgetall(keys.LIVE)
    pipe.hgetall(keys.STATS if partner is None else keys.partner_stats(partner))
    pipe.smembers(keys.PARTNERS)
    pipe.zcard(keys.DEAD_INDEX)
    pipe.mget([f"{keys.DELIVERED_PER_MINUTE}:{minute}" for minute in minute_numbers])
    pipe.get(keys.RATE_LIMIT_PENALTY)
    pipe.hget(keys.BREAKER, "state")
    pipe.zrevrange(keys.COMPANY_WAITING, 0, TOP_COMPANIES - 1, withscores=True)
    pipe.smembers(keys.BREAKER_GEOLOCATIONS)
    pipe.hgetall(keys.POSTS_IN_FLIGHT)
    replies = pipe.execute()
    lengths, rest = replies[: len(lists)], replies[len(lists) :]
    (
        reserved,
        live,
        totals,
        partner_names,
        dead_size,
        counts,
        penalty,
        breaker_state,
        top,
        geos,
        posts,
    ) = rest
    names = sorted(name for name in partner_names if is_partner_name(name))
    geolocations = sorted(str(name) for name in geos if name != DEFAULT_GEOLOCATION)
    by_partner: dict[str, Mapping[str, str]] = {}
    by_geolocation: dict[str, Any] = {}
    if names or geolocations:
        pipe = runtime.redis.pipeline(transaction=False)
        for name in names:
            pipe.hgetall(keys.partner_stats(name))
        for geolocation in geolocations:
            pipe.hget(keys.breaker(geolocation), "state")
        answers = pipe.execute()
        by_partner = dict(zip(names, answers[: len(names)], strict=True))
        by_geolocation = dict(zip(geolocations, answers[len(names) :], strict=True))
    return build(
        at_ms=at,
        queue=queue,
        queue_lengths=lengths,
        reserved=reserved,
        live=live,
        totals=totals,
        dead_index_size=dead_size,
        minute_counts=list(zip(minute_numbers, counts, strict=True)),
        penalty=penalty,
        breaker_state=breaker_state,
        breakers=by_geolocation,
        partners=by_partner,
        partner=partner,
        # O(companies) pipelined reads of each one's state: exact, and a partner has hundreds.
        companies=CompanyRegistry.from_settings(runtime.redis, runtime.settings).counts_by_state(),
        waiting_by_company=top,
        posts_in_flight=posts,
    )


class _Collector:
    """Hands one ``Stats`` snapshot to prometheus_client as metric families."""

    def __init__(self, stats: Stats) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        stats = self.stats
        yield _gauge(
            "notify_queued",
            "Messages waiting in the broker queue for a worker.",
            stats.queued,
            queue=stats.queue,
        )
        yield _gauge(
            "notify_reserved",
            "Messages workers have taken from the broker and not yet acknowledged.",
            stats.reserved,
        )
        yield _gauge(
            "notify_inflight", "Messages claimed by a worker for an attempt now.", stats.inflight
        )
        yield _gauge(
            "notify_posts_in_flight",
            "Posts the worker processes have in flight (claimed for a post, outcome not yet "
            "written): each process's most since its last heartbeat, summed.",
            stats.posts_in_flight,
        )
        yield _gauge(
            "notify_posts_in_flight_process_max",
            "The most posts one worker process has in flight: what a SIGKILL of it may cost "
            "in double posts (at most NOTIFY_MAX_IN_FLIGHT).",
            stats.posts_in_flight_most,
        )
        yield _gauge(
            "notify_retry_waiting",
            "Messages waiting on the schedule for their next attempt.",
            stats.retry_waiting,
        )
        yield _gauge(
            "notify_lane_waiting",
            "New messages waiting in the companies' lanes for the dispatcher.",
            stats.waiting_in_lanes,
        )
        dead = GaugeMetricFamily(
            "notify_dead_letters", "Dead letters held now, by reason.", labels=["reason"]
        )
        for reason, count in sorted(stats.dead_letters.items()):
            dead.add_metric([reason], count)
        yield dead
        dead_ever = CounterMetricFamily(
            "notify_dead_lettered",
            "Messages dead-lettered since the start, by reason.",
            labels=["reason"],
        )
        for reason, count in sorted(stats.dead_lettered_total.items()):
            dead_ever.add_metric([reason], count)
        yield dead_ever
        for field_name, metric, text in _COUNTERS:
            yield CounterMetricFamily(
                metric.removesuffix("_total"), text, value=stats.totals.get(field_name, 0)
            )
        yield _gauge(
            "notify_delivered_last_minute",
            "Messages delivered in the last complete wall-clock minute.",
            stats.delivered_last_minute,
        )
        yield _gauge(
            "notify_rate_limit_penalty_factor",
            "How many times slower than the configured rate workers post now (1 = no 429 penalty).",
            stats.rate_limit_penalty_factor,
        )
        breakers = GaugeMetricFamily(
            "notify_breaker_state",
            "The circuit breaker of each geolocation (default: the default company's): 0 closed, "
            "1 half-open (one probe decides), 2 open (no posts).",
            labels=["geolocation"],
        )
        for name, state in (stats.breakers or {DEFAULT_GEOLOCATION: stats.breaker_state}).items():
            breakers.add_metric([name], STATE_NUMBERS.get(state, 0))
        yield breakers
        by_partner = CounterMetricFamily(
            "notify_partner_messages",
            "Outcomes by partner: delivered, retried, deferred (no rate-limit permit), replayed.",
            labels=["partner", "outcome"],
        )
        dead_by_partner = CounterMetricFamily(
            "notify_partner_dead_lettered",
            "Messages dead-lettered since the start, by partner and reason.",
            labels=["partner", "reason"],
        )
        for name, counts in sorted(stats.partners.items()):
            for field_name in ("delivered", "retried", "deferred", "replayed"):
                by_partner.add_metric([name, field_name], counts.get(field_name, 0))
            for counter, value in sorted(counts.items()):
                if counter.startswith("dead:"):
                    dead_by_partner.add_metric([name, counter.removeprefix("dead:")], value)
        yield by_partner
        yield dead_by_partner
        companies = GaugeMetricFamily(
            "notify_companies",
            "Companies in the registry by state (the default company, from the settings, is not "
            "counted).",
            labels=["state"],
        )
        for state, count in sorted(stats.companies.items()):
            companies.add_metric([state], count)
        yield companies


def _gauge(name: str, text: str, value: float, **labels: str) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, text, labels=list(labels))
    family.add_metric(list(labels.values()), value)
    return family


def render_prometheus(stats: Stats) -> str:
    """The Prometheus text exposition (format 0.0.4) of ``stats``, for ``/metrics``.

    prometheus_client writes it: each snapshot is handed over by a collector, so ``/metrics``
    stays one pipelined Redis read (``collect``) however many series there are.
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(stats))
    return generate_latest(registry).decode("utf-8")
