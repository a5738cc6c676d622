"""An outcome event's attempt, and the mover that publishes due events (docs/webhooks.md).

The same engine and rules as messages: events wait on a schedule in Redis
(``keys.WEBHOOK_SCHEDULE``); the ``WebhookMover`` of each worker publishes the due ones as
``tasks.send_webhook`` tasks on a queue of their own (``<NOTIFY_QUEUE_NAME>.webhooks``); a task
claims its event under a lease (a second copy is fenced off), posts it, and records the outcome:
done, again after the retry policy's backoff (``NOTIFY_MAX_ATTEMPTS``, ``NOTIFY_BACKOFF_*``), or
a webhook dead letter after the last attempt.

What keeps a partner's endpoint from slowing the posts to Concur: its own queue and task; at
most ``NOTIFY_WEBHOOK_CONCURRENCY`` posts at once per worker process (an event that finds them
all busy goes back on the schedule at once, without waiting in a thread); one deadline per post
(``NOTIFY_WEBHOOK_TIMEOUT_SECONDS``); and a circuit breaker per endpoint (``host[:port]``, the
``NOTIFY_BREAKER_*`` policy): while it is open, events wait on the schedule without spending
attempts, as messages do.

Failure reasons of a webhook dead letter::

    no_webhook        the partner's webhook was removed before the event went out
    secret_unreadable its signing secret does not open with NOTIFY_TOKEN_ENCRYPTION_KEY
    endpoint_refused  the URL or what its host resolves to is refused (worker.rules.endpoints)
    http_status       the endpoint answered, not 2xx (a redirect too: never followed)
    timeout | connect | protocol   no answer (worker.concur.transport's kinds)
"""

from __future__ import annotations

import functools
import logging
import random
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from worker.concur.transport import Answer, ExchangeFailed
from worker.limits.breaker import CLOSED, PROBE, Breaker, BreakerPolicy
from worker.ops.background import Loop
from worker.rules.endpoints import EndpointRefused, check_url
from worker.rules.retries import RetryPolicy
from worker.runtime import get_runtime
from worker.settings import Settings
from worker.store import keys
from worker.store.codec import now_ms
from worker.store.webhooks import Event, WebhookStore
from worker.webhooks import sender, signing
from worker.webhooks.guard import Resolver, Target, resolve, system_resolver

log = logging.getLogger("notify.webhooks")

# An event found with every webhook slot of its process busy is looked at again this soon.
BUSY_RECHECK_MS = 1_000
MOVER_BATCH = 500


@dataclass(frozen=True, slots=True)
class WebhookPolicy:
    """How webhook events are posted; built from the settings."""

    allow_private: bool = False
    timeout_seconds: float = 10.0
    concurrency: int = 2
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    breaker: BreakerPolicy = field(default_factory=BreakerPolicy)

    @classmethod
    def from_settings(cls, settings: Settings) -> WebhookPolicy:
        """``NOTIFY_WEBHOOK_*``, the retry policy of messages, the breaker policy of Concur's."""
        breaker = BreakerPolicy.from_settings(settings)
        return cls(
            allow_private=settings.webhook_allow_private,
            timeout_seconds=settings.webhook_timeout_seconds,
            concurrency=settings.webhook_concurrency,
            retry=RetryPolicy.from_settings(settings),
            breaker=BreakerPolicy(
                enabled=breaker.enabled,
                window_seconds=breaker.window_seconds,
                min_calls=breaker.min_calls,
                failure_ratio=breaker.failure_ratio,
                open_seconds=breaker.open_seconds,
                max_open_seconds=breaker.max_open_seconds,
                probe_lease_seconds=settings.webhook_timeout_seconds + 5,
            ),
        )

    @property
    def lease_ms(self) -> int:
        """How long a claimed event is the claimer's: its post's deadline and a margin."""
        return int((self.timeout_seconds + 30) * 1000)


class EndpointBreaker(Breaker):
    """The circuit breaker of one webhook endpoint (``host[:port]``), on keys of its own: the
    machinery of Concur's breakers (``worker.limits.breaker``), never one of theirs."""

    def __init__(self, redis: Redis, policy: BreakerPolicy, endpoint: str) -> None:
        super().__init__(redis, policy, endpoint)
        self.name = f"webhook {endpoint}"
        self.key = keys.webhook_breaker(endpoint)
        self.window_key = keys.webhook_breaker_window(endpoint)
        # Its openings are counted in its own hash, not among Concur's (keys.STATS).
        self.stats_key = self.key


Post = Callable[[Target, dict[str, str], bytes], Answer]


class WebhookDelivery:
    """Attempts events: one per ``attempt`` call; thread-safe (a worker's pool threads share it)."""

    def __init__(
        self,
        store: WebhookStore,
        policy: WebhookPolicy,
        *,
        resolver: Resolver = system_resolver,
        post: Post | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.store = store
        self.policy = policy
        self.resolver = resolver
        self._post = post or functools.partial(sender.post, timeout_seconds=policy.timeout_seconds)
        self._slots = threading.BoundedSemaphore(policy.concurrency)
        self._breakers: dict[str, EndpointBreaker] = {}
        self._lock = threading.Lock()
        self._rng = rng or random.Random()

    def breaker(self, endpoint: str) -> EndpointBreaker:
        """The breaker of ``endpoint`` (``host[:port]``), made on first use."""
        made = self._breakers.get(endpoint)
        if made is None:
            with self._lock:
                made = self._breakers.setdefault(
                    endpoint, EndpointBreaker(self.store.redis, self.policy.breaker, endpoint)
                )
        return made

    def attempt(self, event_id: str) -> str:
        """Attempt one event; what happened: ``skipped`` (not ours to send now), ``sent``,
        ``busy`` or ``paused`` (back on the schedule, no attempt spent), ``retry``, ``dead``."""
        owner = uuid.uuid4().hex
        event = self.store.claim(event_id, owner=owner, lease_ms=self.policy.lease_ms)
        if event is None:
            return "skipped"
        config = self.store.get(event.partner)
        if config is None:
            self.store.dead(
                event_id,
                owner,
                reason="no_webhook",
                detail=f"partner {event.partner} has no webhook any more",
                counted=False,
            )
            log.warning("webhook event %s dead: partner %s has no webhook", event_id, event.partner)
            return "dead"
        try:
            endpoint = check_url(config.url, allow_private=self.policy.allow_private)
        except EndpointRefused as refused:
            return self._failed(event, owner, None, "endpoint_refused", refused.detail, "")
        if not self._slots.acquire(blocking=False):
            jitter = self._rng.randint(0, BUSY_RECHECK_MS)
            self.store.defer(event_id, owner, now_ms() + BUSY_RECHECK_MS + jitter)
            return "busy"
        try:
            return self._post_event(event, owner, endpoint.name, config.url)
        finally:
            self._slots.release()

    def _post_event(self, event: Event, owner: str, endpoint: str, url: str) -> str:
        breaker = self.breaker(endpoint)
        admission = breaker.admit()
        if admission.verdict not in (CLOSED, PROBE):
            self.store.defer(event.id, owner, max(admission.until_ms, now_ms() + BUSY_RECHECK_MS))
            return "paused"
        probe = admission.verdict == PROBE
        try:
            target = resolve(url, allow_private=self.policy.allow_private, resolver=self.resolver)
        except EndpointRefused as refused:
            breaker.record(1, 1, probe=False if probe else None)
            return self._failed(event, owner, None, "endpoint_refused", refused.detail, endpoint)
        body = event.body()
        try:
            secrets = self.store.signing_secrets(event.partner)
        except ValueError as unreadable:  # sealed under a key no longer configured
            return self._failed(event, owner, None, "secret_unreadable", str(unreadable), endpoint)
        if not secrets:  # removed between the claim and now
            return self._failed(event, owner, None, "no_webhook", "no signing secret", endpoint)
        headers = {
            "content-type": "application/json",
            **signing.headers(secrets, event.id, int(time.time()), body),
        }
        try:
            answer = self._post(target, headers, body.encode("utf-8"))
        except ExchangeFailed as failure:
            breaker.record(1, 1, probe=False if probe else None)
            return self._failed(event, owner, None, failure.kind, failure.detail, endpoint)
        ok = 200 <= answer.status < 300
        breaker.record(1, 0 if ok else 1, probe=ok if probe else None)
        if ok:
            self.store.sent(event.id, owner)
            log.info(
                "webhook event %s (%s) sent to %s: %d",
                event.id,
                event.type,
                endpoint,
                answer.status,
                extra={"partner": event.partner, "endpoint": endpoint},
            )
            return "sent"
        retry_after = _retry_after(answer.headers.get("retry-after"))
        return self._failed(
            event,
            owner,
            answer.status,
            "http_status",
            f"the endpoint answered {answer.status}",
            endpoint,
            retry_after=retry_after,
        )

    def _failed(
        self,
        event: Event,
        owner: str,
        status: int | None,
        reason: str,
        detail: str,
        endpoint: str,
        *,
        retry_after: float | None = None,
    ) -> str:
        attempt = event.attempts + 1
        extra = {"partner": event.partner, "endpoint": endpoint, "reason": reason}
        if self.policy.retry.can_retry(attempt):
            delay = self.policy.retry.delay_seconds(attempt, retry_after, self._rng)
            self.store.retry(
                event.id, owner, now_ms() + int(delay * 1000), status=status, detail=detail
            )
            log.warning(
                "webhook event %s attempt %d failed (%s: %s); again in %.1fs",
                event.id,
                attempt,
                reason,
                detail,
                delay,
                extra=extra,
            )
            return "retry"
        self.store.dead(event.id, owner, reason=reason, detail=detail, status=status)
        log.warning(
            "webhook event %s dead after %d attempts (%s: %s)",
            event.id,
            attempt,
            reason,
            detail,
            extra=extra,
        )
        return "dead"


def _retry_after(value: str | None) -> float | None:
    # Seconds only (an HTTP date is rare from a webhook receiver; the backoff applies then).
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    return seconds if 0 <= seconds < 86_400 else None


class WebhookMover(Loop):
    """Publishes due events as webhook tasks, every ``interval_seconds``."""

    def __init__(
        self,
        store: WebhookStore,
        publish: Callable[[Sequence[str]], None],
        interval_seconds: float,
        *,
        grace_ms: int,
    ) -> None:
        self.store = store
        self.publish = publish
        self.interval_seconds = interval_seconds
        self.grace_ms = grace_ms
        super().__init__("notify-webhook-mover")

    def run_once(self) -> int:
        """Publish every event due now; how many."""
        moved = 0
        while True:
            batch = self.store.due(limit=MOVER_BATCH, grace_ms=self.grace_ms)
            if batch:
                self.publish(batch)
            moved += len(batch)
            if len(batch) < MOVER_BATCH:
                return moved

    def _step(self) -> float:
        try:
            moved = self.run_once()
            if moved:
                log.info("webhook mover published %d due events", moved)
        except (RedisConnectionError, RedisTimeoutError) as error:
            log.warning("webhook mover: Redis unavailable (%s)", error)
            return min(self.interval_seconds * 5, 10.0)
        except Exception:  # a bug, or the broker away: the thread goes on, the events wait
            log.exception("webhook mover tick failed")
            return min(self.interval_seconds * 5, 10.0)
        return self.interval_seconds


_delivery: WebhookDelivery | None = None
_delivery_lock = threading.Lock()


def get_delivery() -> WebhookDelivery:
    """This process's ``WebhookDelivery``, made on first use from the runtime."""
    global _delivery
    with _delivery_lock:
        if _delivery is None:
            runtime = get_runtime()
            _delivery = WebhookDelivery(
                WebhookStore.from_settings(runtime.redis, runtime.settings),
                WebhookPolicy.from_settings(runtime.settings),
            )
        return _delivery
