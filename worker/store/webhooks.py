"""Partners' outcome webhooks and their events in Redis (docs/webhooks.md).

Each partner may have one webhook (``keys.webhook``): its URL, the event types it takes, and its
signing secret, sealed with ``NOTIFY_TOKEN_ENCRYPTION_KEY`` like refresh tokens (``Cipher``).
``rotate`` makes a new secret and keeps the old one, sealed, for
``NOTIFY_WEBHOOK_ROTATION_GRACE_SECONDS``: meanwhile every event is signed with both.

Events are written by the scripts that record a message's end (``lua/webhook.lua``, called by
``dead.lua`` and ``delivered.lua``), in the same atomic step, so an outcome is never recorded
without its event. An event's life (``state`` in ``keys.webhook_event``)::

    pending ──claim──► sending ──2xx──► (deleted; counted as webhook_sent)
       ▲                  ├── failed attempt, attempts left ──► pending, due after the backoff
       │                  ├── not attempted (breaker open, process busy) ──► pending, due later
       │                  └── last attempt failed ──► dead (``keys.WEBHOOK_DEAD``)
       └──────────── replay ◄──────────────────────────────────┘

``keys.WEBHOOK_SCHEDULE`` holds every event that is not dead, scored by when it must next be
sent (or, being sent, when its lease ends), so a task lost anywhere is published again by the
webhook mover (``worker.webhooks.delivery``), as messages are by theirs.
"""

from __future__ import annotations

import base64
import itertools
import json
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any

from redis import Redis

from worker.settings import Settings
from worker.shapes.models import is_partner_name
from worker.shapes.times import int_or_none, iso_utc
from worker.store import keys
from worker.store.codec import now_ms
from worker.store.sealing import Cipher

FAILED, EXPIRED, DELIVERED = "message.failed", "message.expired", "message.delivered"
EVENT_TYPES = (FAILED, EXPIRED, DELIVERED)
DEFAULT_EVENTS = (FAILED, EXPIRED)
SECRET_PREFIX = "whsec_"
SECRET_BYTES = 32

_LUA = resources.files("worker.store") / "lua"


def _script(name: str) -> str:
    return (_LUA / f"{name}.lua").read_text(encoding="utf-8")


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def new_secret() -> str:
    """A new signing secret: ``whsec_`` and the base64 of 32 random bytes (the spec: 24-64)."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode("ascii")


def parse_events(text: str | Iterable[str] | None) -> tuple[str, ...]:
    """The event types named (comma-separated or a list), in ``EVENT_TYPES`` order; None or
    empty: ``DEFAULT_EVENTS``. ``ValueError`` names an unknown type (pure)."""
    if text is None:
        return DEFAULT_EVENTS
    names = text.split(",") if isinstance(text, str) else list(text)
    wanted = {name.strip() for name in names if name.strip()}
    if not wanted:
        return DEFAULT_EVENTS
    unknown = sorted(wanted - set(EVENT_TYPES))
    if unknown:
        raise ValueError(
            f"unknown event type {unknown[0]!r}: the types are {', '.join(EVENT_TYPES)}"
        )
    return tuple(name for name in EVENT_TYPES if name in wanted)


def checked_partner(partner: str) -> str:
    """``partner`` when it is a partner name; ``ValueError`` otherwise (it is part of a key)."""
    if not is_partner_name(partner):
        raise ValueError(f"{partner!r} is not a partner name (lower-case letters, digits, _.-)")
    return partner


@dataclass(frozen=True, slots=True)
class WebhookConfig:
    """A partner's webhook as operators see it: never its secrets."""

    partner: str
    url: str
    events: tuple[str, ...]
    created_ms: int | None
    updated_ms: int | None
    # Until when the previous secret still signs (after a rotation), or None.
    rotating_until_ms: int | None

    def to_json(self) -> dict[str, Any]:
        """The API's and ``show --json``'s form."""
        return {
            "partner": self.partner,
            "url": self.url,
            "events": list(self.events),
            "created": iso_utc(self.created_ms),
            "updated": iso_utc(self.updated_ms),
            "previous_secret_until": iso_utc(self.rotating_until_ms),
        }


@dataclass(frozen=True, slots=True)
class Event:
    """One outcome event as stored (``keys.webhook_event``)."""

    id: str
    type: str
    message_id: str
    partner: str
    company: str
    at_ms: int
    state: str
    attempts: int
    reason: str | None = None
    status: int | None = None
    errors: tuple[Any, ...] = ()
    message_attempts: int | None = None
    # The last attempt's HTTP status and why it failed; a dead event's reason and when it died.
    last_status: int | None = None
    detail: str | None = None
    dead_reason: str | None = None
    dead_ms: int | None = None

    @classmethod
    def from_fields(cls, event_id: str, fields: Mapping[Any, Any]) -> Event:
        """An event from its hash's fields (text or bytes)."""
        f = {_text(k): _text(v) for k, v in fields.items()}
        try:
            errors = json.loads(f.get("errors") or "[]")
        except ValueError:
            errors = []
        return cls(
            id=event_id,
            type=f.get("type", ""),
            message_id=f.get("msg", ""),
            partner=f.get("partner", ""),
            company=f.get("company", "default"),
            at_ms=int_or_none(f.get("at")) or 0,
            state=f.get("state", ""),
            attempts=int_or_none(f.get("n")) or 0,
            reason=f.get("reason") or None,
            status=int_or_none(f.get("status")),
            errors=tuple(errors) if isinstance(errors, list) else (),
            message_attempts=int_or_none(f.get("attempts")),
            last_status=int_or_none(f.get("hstatus")),
            detail=f.get("detail") or None,
            dead_reason=f.get("why") or None,
            dead_ms=int_or_none(f.get("dead")),
        )

    def body(self) -> str:
        """The JSON the partner's endpoint receives: the same bytes at every attempt (pure)."""
        data: dict[str, Any] = {"partner": self.partner}
        if self.message_id:  # a test event (``webhook.test``) is about no message
            data["id"] = self.message_id
            data["company"] = self.company
        if self.type in (FAILED, EXPIRED):
            data["reason"] = self.reason
            data["status"] = self.status
            data["errors"] = list(self.errors)
            data["attempts"] = self.message_attempts
        document = {
            "type": self.type,
            "timestamp": iso_utc(self.at_ms, millis=True),
            "data": data,
        }
        return json.dumps(document, separators=(",", ":"), ensure_ascii=False)

    def to_json(self) -> dict[str, Any]:
        """A webhook dead letter (or pending event) as the failed lists show it."""
        return {
            "id": self.id,
            "kind": "webhook",
            "type": self.type,
            "message_id": self.message_id,
            "partner": self.partner,
            "state": self.state,
            "attempts": self.attempts,
            "reason": self.dead_reason,
            "detail": self.detail,
            "http_status": self.last_status,
            "created": iso_utc(self.at_ms, millis=True),
            "dead": iso_utc(self.dead_ms, millis=True),
        }


class NoSealingKey(ValueError):
    """A webhook secret cannot be stored: ``NOTIFY_TOKEN_ENCRYPTION_KEY`` is not set."""

    def __init__(self) -> None:
        super().__init__(
            "NOTIFY_TOKEN_ENCRYPTION_KEY: required to keep webhook signing secrets (they are "
            "stored sealed, like refresh tokens); make one with `python -c 'from "
            "cryptography.fernet import Fernet; print(Fernet.generate_key().decode())'`"
        )


class WebhookStore:
    """Partners' webhooks and their events; every change of an event is one atomic script."""

    def __init__(self, redis: Redis, cipher: Cipher, *, rotation_grace_seconds: int) -> None:
        self.redis = redis
        self.cipher = cipher
        self.rotation_grace_ms = rotation_grace_seconds * 1000
        self._due = redis.register_script(_script("webhook_due"))
        self._claim = redis.register_script(_script("webhook_claim"))
        self._end = redis.register_script(_script("webhook_end"))
        self._replay = redis.register_script(_script("webhook_replay"))

    @classmethod
    def from_settings(cls, redis: Redis, settings: Settings) -> WebhookStore:
        """The store over ``redis``, sealing with ``NOTIFY_TOKEN_ENCRYPTION_KEY``."""
        key = settings.token_encryption_key
        return cls(
            redis,
            Cipher(None if key is None else key.get_secret_value()),
            rotation_grace_seconds=settings.webhook_rotation_grace_seconds,
        )

    # -- each partner's webhook ------------------------------------------------------------

    def _check_sealing(self) -> None:
        # A secret in clear text in Redis would sign events for anyone who reads it.
        if self.cipher.seal("").startswith("p:"):
            raise NoSealingKey

    def set(self, partner: str, url: str, events: Iterable[str]) -> tuple[WebhookConfig, str]:
        """Create or change ``partner``'s webhook (``url`` checked by the caller); its signing
        secret: a new one, or the one it had (``rotate`` makes a new one)."""
        key = keys.webhook(checked_partner(partner))
        chosen = parse_events(list(events))
        self._check_sealing()
        now = now_ms()
        stored = self.redis.hget(key, "secret")
        secret = self.cipher.open(_text(stored)) if stored else new_secret()
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(
            key,
            mapping={
                "url": url,
                "events": ",".join(chosen),
                "secret": self.cipher.seal(secret) if not stored else _text(stored),
                "updated": now,
            },
        )
        pipe.hsetnx(key, "created", now)
        pipe.sadd(keys.WEBHOOKS, partner)
        pipe.execute()
        config = self.get(partner)
        assert config is not None
        return config, secret

    def get(self, partner: str) -> WebhookConfig | None:
        """``partner``'s webhook, or None."""
        fields = self.redis.hgetall(keys.webhook(checked_partner(partner)))
        return _config(partner, fields)

    def all(self) -> list[WebhookConfig]:
        """Every partner's webhook, by partner."""
        partners = sorted(_text(p) for p in self.redis.smembers(keys.WEBHOOKS))
        partners = [p for p in partners if is_partner_name(p)]
        if not partners:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for partner in partners:
            pipe.hgetall(keys.webhook(partner))
        found = [_config(p, f) for p, f in zip(partners, pipe.execute(), strict=True)]
        return [config for config in found if config is not None]

    def signing_secrets(self, partner: str, *, at_ms: int | None = None) -> list[str]:
        """The secrets an event is signed with now: the current one, then the previous one while
        its grace period lasts. Empty when the partner has no webhook."""
        fields = self.redis.hmget(
            keys.webhook(checked_partner(partner)), ["secret", "old", "old_until"]
        )
        current, old, until = (None if v is None else _text(v) for v in fields)
        if current is None:
            return []
        found = [self.cipher.open(current)]
        if old and (int_or_none(until) or 0) > (now_ms() if at_ms is None else at_ms):
            found.append(self.cipher.open(old))
        return found

    def rotate(self, partner: str) -> str:
        """A new signing secret for ``partner``; the current one keeps signing for the grace
        period. ``KeyError`` when the partner has no webhook."""
        key = keys.webhook(checked_partner(partner))
        stored = self.redis.hget(key, "secret")
        if stored is None:
            raise KeyError(partner)
        self._check_sealing()
        secret = new_secret()
        now = now_ms()
        self.redis.hset(
            key,
            mapping={
                "secret": self.cipher.seal(secret),
                "old": _text(stored),
                "old_until": now + self.rotation_grace_ms,
                "updated": now,
            },
        )
        return secret

    def remove(self, partner: str) -> bool:
        """Delete ``partner``'s webhook; its pending events become dead letters when next
        attempted (reason ``no_webhook``). False when there was none."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.delete(keys.webhook(checked_partner(partner)))
        pipe.srem(keys.WEBHOOKS, partner)
        removed, _ = pipe.execute()
        return bool(removed)

    def test_event(self, partner: str) -> str:
        """Schedule a ``webhook.test`` event for ``partner``'s endpoint now; its id.
        ``KeyError`` when the partner has no webhook."""
        if self.get(partner) is None:
            raise KeyError(partner)
        event_id = "evt_" + secrets.token_hex(16)
        now = now_ms()
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(
            keys.webhook_event(event_id),
            mapping={
                "type": "webhook.test",
                "msg": "",
                "partner": partner,
                "company": "default",
                "at": now,
                "state": "pending",
                "n": 0,
            },
        )
        pipe.zadd(keys.WEBHOOK_SCHEDULE, {event_id: now})
        pipe.execute()
        return event_id

    # -- events ----------------------------------------------------------------------------

    def due(self, *, limit: int, grace_ms: int) -> list[str]:
        """Events due now (each pushed ``grace_ms`` ahead on the schedule)."""
        return [
            _text(i)
            for i in self._due(keys=[keys.WEBHOOK_SCHEDULE], args=[now_ms(), limit, grace_ms])
        ]

    def claim(self, event_id: str, *, owner: str, lease_ms: int) -> Event | None:
        """Take the event for one attempt; None when it is not due, taken, sent or dead."""
        flat = self._claim(
            keys=[keys.webhook_event(event_id), keys.WEBHOOK_SCHEDULE],
            args=[event_id, owner, now_ms(), lease_ms],
        )
        if not flat:
            return None
        return Event.from_fields(event_id, dict(zip(flat[::2], flat[1::2], strict=True)))

    def _finish(
        self,
        event_id: str,
        owner: str,
        outcome: str,
        *,
        due_ms: int = 0,
        counted: bool = False,
        status: int | None = None,
        detail: str = "",
        reason: str = "",
    ) -> bool:
        return bool(
            self._end(
                keys=[
                    keys.webhook_event(event_id),
                    keys.WEBHOOK_SCHEDULE,
                    keys.WEBHOOK_DEAD,
                    keys.STATS,
                ],
                args=[
                    event_id,
                    owner,
                    outcome,
                    now_ms(),
                    due_ms,
                    "1" if counted else "0",
                    "" if status is None else status,
                    detail[:500],
                    reason,
                ],
            )
        )

    def sent(self, event_id: str, owner: str) -> bool:
        """The endpoint answered 2xx: the event is done (deleted)."""
        return self._finish(event_id, owner, "sent")

    def retry(
        self, event_id: str, owner: str, due_ms: int, *, status: int | None, detail: str
    ) -> bool:
        """A failed attempt with attempts left: pending again, due at ``due_ms``."""
        return self._finish(
            event_id, owner, "retry", due_ms=due_ms, counted=True, status=status, detail=detail
        )

    def defer(self, event_id: str, owner: str, due_ms: int) -> bool:
        """Not attempted (breaker open, the process busy): pending again, no attempt spent."""
        return self._finish(event_id, owner, "defer", due_ms=due_ms)

    def dead(
        self,
        event_id: str,
        owner: str,
        *,
        reason: str,
        detail: str,
        status: int | None = None,
        counted: bool = True,
    ) -> bool:
        """The last attempt failed (or none can be made): a webhook dead letter."""
        return self._finish(
            event_id, owner, "dead", counted=counted, status=status, detail=detail, reason=reason
        )

    def event(self, event_id: str) -> Event | None:
        """One event (pending, being sent or dead), or None."""
        fields = self.redis.hgetall(keys.webhook_event(event_id))
        return Event.from_fields(event_id, fields) if fields else None

    def dead_letters(self, *, limit: int = 100, partner: str | None = None) -> list[Event]:
        """Webhook dead letters, newest first (``partner``: only that partner's)."""
        found: list[Event] = []
        for start in itertools.count(0, 500):
            chunk = [_text(i) for i in self.redis.zrevrange(keys.WEBHOOK_DEAD, start, start + 499)]
            if not chunk:
                return found
            pipe = self.redis.pipeline(transaction=False)
            for event_id in chunk:
                pipe.hgetall(keys.webhook_event(event_id))
            for event_id, fields in zip(chunk, pipe.execute(), strict=True):
                if not fields:
                    continue
                event = Event.from_fields(event_id, fields)
                if partner is None or event.partner == partner:
                    found.append(event)
                    if len(found) >= limit:
                        return found
        return found

    def dead_count(self) -> int:
        """How many webhook dead letters there are."""
        return int(self.redis.zcard(keys.WEBHOOK_DEAD))

    def pending_count(self) -> int:
        """How many events wait to be sent (or are being sent)."""
        return int(self.redis.zcard(keys.WEBHOOK_SCHEDULE))

    def replay(self, event_id: str) -> bool:
        """A webhook dead letter back to pending, due now; False when there is no such letter."""
        return bool(
            self._replay(
                keys=[keys.webhook_event(event_id), keys.WEBHOOK_SCHEDULE, keys.WEBHOOK_DEAD],
                args=[event_id, now_ms()],
            )
        )

    def forget(self, event_id: str) -> bool:
        """Delete a webhook dead letter; False when there is none."""
        if self.redis.hget(keys.webhook_event(event_id), "state") is None:
            return False
        pipe = self.redis.pipeline(transaction=True)
        pipe.delete(keys.webhook_event(event_id))
        pipe.zrem(keys.WEBHOOK_DEAD, event_id)
        pipe.zrem(keys.WEBHOOK_SCHEDULE, event_id)
        pipe.execute()
        return True


def _config(partner: str, fields: Mapping[Any, Any]) -> WebhookConfig | None:
    if not fields:
        return None
    f = {_text(k): _text(v) for k, v in fields.items()}
    if "url" not in f:
        return None
    until = int_or_none(f.get("old_until"))
    return WebhookConfig(
        partner=partner,
        url=f["url"],
        events=tuple(e for e in f.get("events", "").split(",") if e),
        created_ms=int_or_none(f.get("created")),
        updated_ms=int_or_none(f.get("updated")),
        rotating_until_ms=until if until and until > now_ms() else None,
    )
