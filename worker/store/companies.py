"""The company registry: every Concur company this deployment delivers to, beside the default one.

A company is named by its Concur company UUID (``worker.shapes.models.is_company_id``). Each one
is a Redis hash (``keys.company``) and its id is in the set ``keys.COMPANIES``; the fields:

* ``state``: ``connected``, ``needs_reconnect`` (Concur refused its refresh token) or
  ``disconnected`` (an operator removed it);
* ``refresh``: the refresh token, sealed with ``NOTIFY_TOKEN_ENCRYPTION_KEY`` (``Cipher``: never in
  clear text at rest), and ``refresh_expires_ms``;
* ``geolocation``: the base URL Concur named for the company (``https://us2.api...``);
* ``connected_ms``, ``refreshed_ms``, ``state_ms``: when it was connected, when its refresh token
  last rotated, when its state last changed; ``reason``: why (never a secret).

Beside the hash, ``keys.company_access`` holds the company's current access token (sealed like
the refresh token, with its expiry and geolocation) for the fleet's worker processes to share
(``share_access``, ``shared_access``): one token request per company across the fleet instead
of one per process. It expires from Redis when the processes would renew it anyway, and a
reconnection, a refused refresh token or a disconnection deletes it.

Every change is one atomic step (a transaction, or a script that checks the state first): a
worker storing a rotated token never brings back a company an operator disconnected meanwhile.
The default company (the settings' ``NOTIFY_API_TOKEN`` or ``NOTIFY_OAUTH_*``) is not kept here;
``worker.concur.companies.default_company`` describes it.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

from redis import Redis

from worker.settings import Settings
from worker.shapes.models import COMPANY_STATES, CompanyState, is_company_id
from worker.shapes.times import int_or_none, iso_utc
from worker.store import keys
from worker.store.sealing import RESEAL_SCRIPT, Cipher

log = logging.getLogger(__name__)

# Reads of many companies go to Redis in pipelines of this many commands.
PIPELINE_CHUNK = 500
MAX_REASON_LENGTH = 300
CONNECTED: CompanyState = "connected"
NEEDS_RECONNECT: CompanyState = "needs_reconnect"
DISCONNECTED: CompanyState = "disconnected"


@dataclass(frozen=True, slots=True)
class Company:
    """One company as an operator sees it; the refresh token is never part of it."""

    id: str
    state: CompanyState
    geolocation: str | None = None
    connected_ms: int | None = None
    refreshed_ms: int | None = None
    state_ms: int | None = None
    reason: str | None = None
    refresh_expires_ms: int | None = None
    from_settings: bool = False  # the default company, described by the settings

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (``GET /companies/{id}``, ``notify companies show --json``)."""
        return {
            "id": self.id,
            "state": self.state,
            "geolocation": self.geolocation,
            "connectedAt": iso_utc(self.connected_ms, millis=True),
            "refreshedAt": iso_utc(self.refreshed_ms, millis=True),
            "stateChangedAt": iso_utc(self.state_ms, millis=True),
            "refreshExpiresAt": iso_utc(self.refresh_expires_ms, millis=True),
            "reason": self.reason,
            "fromSettings": self.from_settings,
        }


@dataclass(frozen=True, slots=True)
class SharedAccess:
    """A company's access token as the fleet shares it (wall-clock times, ms)."""

    token: str
    expires_ms: int  # Concur refuses it from then on
    renew_ms: int  # a new one is fetched from then on (the Redis copy expires then)
    geolocation: str  # the base URL it came from: where its posts go

    def to_json(self) -> str:
        """The form sealed into Redis."""
        return json.dumps(
            {
                "token": self.token,
                "expires_ms": self.expires_ms,
                "renew_ms": self.renew_ms,
                "geolocation": self.geolocation,
            },
            separators=(",", ":"),
        )


def shared_access_of(text: str) -> SharedAccess | None:
    """A sealed-and-opened ``SharedAccess`` back; None when it is not one (pure)."""
    try:
        document = json.loads(text)
        found = SharedAccess(
            str(document["token"]),
            int(document["expires_ms"]),
            int(document["renew_ms"]),
            str(document["geolocation"]),
        )
    except (ValueError, KeyError, TypeError):
        return None
    return found if found.token and found.geolocation else None


def checked_id(company_id: str) -> str:
    """``company_id`` when it is a company UUID (canonical, lower case); else ``ValueError``."""
    if not is_company_id(company_id):
        raise ValueError(
            "a company id is the company's UUID in lower case, "
            "like 0f3c2f6e-4a1b-4c2d-9e8f-7a6b5c4d3e2f"
        )
    return company_id


def company_of(company_id: str, fields: dict[str, str]) -> Company | None:
    """A stored hash as a ``Company``; None when it is empty (no such company)."""
    if not fields:
        return None
    stored = fields.get("state")
    # A state this version does not know is shown as needing attention, never as connected.
    state: CompanyState = NEEDS_RECONNECT
    for known in COMPANY_STATES:
        if stored == known:
            state = known
    return Company(
        id=company_id,
        state=state,
        geolocation=fields.get("geolocation") or None,
        connected_ms=int_or_none(fields.get("connected_ms")),
        refreshed_ms=int_or_none(fields.get("refreshed_ms")),
        state_ms=int_or_none(fields.get("state_ms")),
        reason=fields.get("reason") or None,
        refresh_expires_ms=int_or_none(fields.get("refresh_expires_ms")),
    )


def count_states(states: list[str | None]) -> dict[str, int]:
    """How many of ``states`` are in each state; every state present, zeros included."""
    counts: dict[str, int] = dict.fromkeys(COMPANY_STATES, 0)
    for state in states:
        if state in counts:
            counts[state] += 1
    return counts


def _text(value: str | bytes) -> str:
    # The registry is handed whatever Redis client the caller has; decoded either way.
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _fields(raw: dict[Any, Any]) -> dict[str, str]:
    return {_text(name): _text(value) for name, value in raw.items()}


def _reason(text: str) -> str:
    return " ".join(text.split())[:MAX_REASON_LENGTH]


def company_states(redis: Redis, company_ids: list[str]) -> dict[str, str | None]:
    """The stored state of each of ``company_ids`` (None: not in the registry), in one
    pipelined round trip; none at all for an empty list. For intake's check
    (``worker.intake.producer.admit``), which reads no secret."""
    ids = [checked_id(company_id) for company_id in dict.fromkeys(company_ids)]
    if not ids:
        return {}
    pipe = redis.pipeline(transaction=False)
    for company_id in ids:
        pipe.hget(keys.company(company_id), "state")
    return {
        company_id: None if state is None else _text(state)
        for company_id, state in zip(ids, pipe.execute(), strict=True)
    }


class CompanyRegistry:
    """The companies in Redis; see the module docstring."""

    def __init__(self, redis: Redis, cipher: Cipher) -> None:
        self.redis = redis
        self.cipher = cipher
        self._refreshed = redis.register_script(_REFRESHED)
        self._needs_reconnect = redis.register_script(_NEEDS_RECONNECT)
        self._disconnect = redis.register_script(_DISCONNECT)
        self._reseal = redis.register_script(RESEAL_SCRIPT)
        self._share = redis.register_script(_SHARE)

    @classmethod
    def from_settings(cls, redis: Redis, settings: Settings) -> CompanyRegistry:
        """The registry over ``redis``, sealing with ``NOTIFY_TOKEN_ENCRYPTION_KEY``."""
        key = settings.token_encryption_key
        return cls(redis, Cipher(None if key is None else key.get_secret_value()))

    def get(self, company_id: str) -> Company | None:
        """The company, or None when the registry has none of that id."""
        fields = self.redis.hgetall(keys.company(checked_id(company_id)))
        return company_of(company_id, _fields(fields))

    def get_many(self, company_ids: list[str]) -> dict[str, Company | None]:
        """Each company (None when unknown or not a company id), in one pipelined round trip."""
        valid = [company_id for company_id in company_ids if is_company_id(company_id)]
        found: dict[str, Company | None] = dict.fromkeys(company_ids)
        if valid:
            pipe = self.redis.pipeline(transaction=False)
            for company_id in valid:
                pipe.hgetall(keys.company(company_id))
            for company_id, fields in zip(valid, pipe.execute(), strict=True):
                found[company_id] = company_of(company_id, _fields(fields))
        return found

    def ids(self) -> list[str]:
        """Every company id in the registry, sorted."""
        members = (_text(member) for member in self.redis.smembers(keys.COMPANIES))
        return sorted(member for member in members if is_company_id(member))

    def all(self) -> list[Company]:
        """Every company in the registry, by id (pipelined reads: O(companies))."""
        ids = self.ids()
        found: list[Company] = []
        for start in range(0, len(ids), PIPELINE_CHUNK):
            chunk = ids[start : start + PIPELINE_CHUNK]
            pipe = self.redis.pipeline(transaction=False)
            for company_id in chunk:
                pipe.hgetall(keys.company(company_id))
            for company_id, fields in zip(chunk, pipe.execute(), strict=True):
                company = company_of(company_id, _fields(fields))
                if company is not None:
                    found.append(company)
        return found

    def counts_by_state(self) -> dict[str, int]:
        """How many companies are in each state (every state listed, zeros included)."""
        ids = self.ids()
        states: list[str | None] = []
        for start in range(0, len(ids), PIPELINE_CHUNK):
            pipe = self.redis.pipeline(transaction=False)
            for company_id in ids[start : start + PIPELINE_CHUNK]:
                pipe.hget(keys.company(company_id), "state")
            states.extend(None if state is None else _text(state) for state in pipe.execute())
        return count_states(states)

    def connected(
        self,
        company_id: str,
        refresh_token: str,
        refresh_expires_ms: int | None,
        geolocation: str,
        now_ms: int,
        *,
        reason: str = "connected",
    ) -> Company:
        """Store a company as connected with a new refresh token (a first connection, or a
        reconnection replacing whatever was there)."""
        key = keys.company(checked_id(company_id))
        fields: dict[Any, Any] = {
            "state": CONNECTED,
            "refresh": self.cipher.seal(refresh_token),
            "geolocation": geolocation,
            "connected_ms": now_ms,
            "refreshed_ms": now_ms,
            "state_ms": now_ms,
            "reason": _reason(reason),
        }
        if refresh_expires_ms is not None:
            fields["refresh_expires_ms"] = refresh_expires_ms
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(key, mapping=fields)
        if refresh_expires_ms is None:
            pipe.hdel(key, "refresh_expires_ms")
        pipe.sadd(keys.COMPANIES, company_id)
        # An access token of the previous connection is not handed out again.
        pipe.delete(keys.company_access(company_id))
        pipe.execute()
        company = self.get(company_id)
        assert company is not None
        return company

    def refreshed(
        self,
        company_id: str,
        refresh_token: str,
        refresh_expires_ms: int | None,
        geolocation: str,
        now_ms: int,
    ) -> bool:
        """Store a rotated refresh token (and the latest geolocation) of a connected company.

        False, and nothing stored, when the company is not connected (an operator disconnected
        it meanwhile, or it waits for a reconnection): a late rotation never revives it.
        """
        return bool(
            self._refreshed(
                keys=[keys.company(checked_id(company_id))],
                args=[
                    self.cipher.seal(refresh_token),
                    "" if refresh_expires_ms is None else refresh_expires_ms,
                    geolocation,
                    now_ms,
                ],
            )
        )

    def needs_reconnect(self, company_id: str, reason: str, now_ms: int) -> bool:
        """Mark a connected company as needing a reconnection (Concur refused its refresh
        token); False when it was not connected. The sealed token is kept (see docs)."""
        return bool(
            self._needs_reconnect(
                keys=[keys.company(checked_id(company_id)), keys.company_access(company_id)],
                args=[_reason(reason), now_ms],
            )
        )

    def disconnect(
        self, company_id: str, now_ms: int, *, reason: str = "disconnected by an operator"
    ) -> Company | None:
        """Disconnect a company: state ``disconnected``, its sealed refresh token deleted.

        The company stays listed (with its history of times); None when there is no such
        company. Disconnecting a disconnected company changes nothing.
        """
        key = keys.company(checked_id(company_id))
        access = keys.company_access(company_id)
        if not self._disconnect(keys=[key, access], args=[_reason(reason), now_ms]):
            return None
        return self.get(company_id)

    def refresh_token(self, company_id: str) -> str | None:
        """The company's refresh token, opened; None when it has none (or it cannot be opened
        with the configured keys: logged). Sealed again when under a retired key."""
        key = keys.company(checked_id(company_id))
        raw = self.redis.hget(key, "refresh")
        return self._opened(company_id, None if raw is None else _text(raw))

    def with_refresh_token(self, company_id: str) -> tuple[Company | None, str | None]:
        """The company and its refresh token opened (as ``get`` and ``refresh_token``), read in
        one round trip: a worker fetching a company's first token reads both under its lock."""
        fields = _fields(self.redis.hgetall(keys.company(checked_id(company_id))))
        return company_of(company_id, fields), self._opened(company_id, fields.get("refresh"))

    def _opened(self, company_id: str, stored: str | None) -> str | None:
        """A stored refresh token opened (see ``refresh_token``)."""
        if not stored:
            return None
        key = keys.company(company_id)
        try:
            token = self.cipher.open(stored)
        except ValueError as error:
            log.error("company %s: stored refresh token ignored: %s", company_id, error)
            return None
        if self.cipher.stale(stored):
            self._reseal(keys=[key], args=[stored, self.cipher.seal(token)])
        return token

    def share_access(self, company_id: str, access: SharedAccess, now_ms: int) -> bool:
        """Hand the company's new access token to the fleet (sealed, expiring from Redis at
        ``access.renew_ms``); False, nothing stored, when the company is not connected or the
        token is already due."""
        ttl_ms = access.renew_ms - now_ms
        if ttl_ms <= 0:
            return False
        key = keys.company(checked_id(company_id))
        sealed = self.cipher.seal(access.to_json())
        return bool(self._share(keys=[key, keys.company_access(company_id)], args=[sealed, ttl_ms]))

    def shared_access(self, company_ids: list[str], now_ms: int) -> dict[str, SharedAccess]:
        """The access tokens the fleet shares for ``company_ids`` and not yet due for renewal,
        in one round trip (an unreadable one is skipped: its company fetches anew)."""
        ids = [company_id for company_id in company_ids if is_company_id(company_id)]
        if not ids:
            return {}
        found: dict[str, SharedAccess] = {}
        raw = self.redis.mget([keys.company_access(company_id) for company_id in ids])
        for company_id, stored in zip(ids, raw, strict=True):
            if not stored:
                continue
            try:
                access = shared_access_of(self.cipher.open(_text(stored)))
            except ValueError:  # sealed under a key no longer configured
                access = None
            if access is not None and access.renew_ms > now_ms:
                found[company_id] = access
        return found


_SHARE = """
-- KEYS: the company, its shared access token ; ARGV: the sealed token, its time to live (ms)
if redis.call('HGET', KEYS[1], 'state') ~= 'connected' then
  return 0
end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
return 1
"""

_REFRESHED = """
-- KEYS: the company ; ARGV: sealed refresh token, its expiry ('' unknown), geolocation, now
if redis.call('HGET', KEYS[1], 'state') ~= 'connected' then
  return 0
end
redis.call('HSET', KEYS[1], 'refresh', ARGV[1], 'geolocation', ARGV[3], 'refreshed_ms', ARGV[4])
if ARGV[2] ~= '' then
  redis.call('HSET', KEYS[1], 'refresh_expires_ms', ARGV[2])
end
return 1
"""

_NEEDS_RECONNECT = """
-- KEYS: the company, its shared access token ; ARGV: reason, now
if redis.call('HGET', KEYS[1], 'state') ~= 'connected' then
  return 0
end
redis.call('HSET', KEYS[1], 'state', 'needs_reconnect', 'state_ms', ARGV[2], 'reason', ARGV[1])
redis.call('DEL', KEYS[2])
return 1
"""

_DISCONNECT = """
-- KEYS: the company, its shared access token ; ARGV: reason, now
local state = redis.call('HGET', KEYS[1], 'state')
if not state then
  return 0
end
if state ~= 'disconnected' then
  redis.call('HSET', KEYS[1], 'state', 'disconnected', 'state_ms', ARGV[2], 'reason', ARGV[1])
end
redis.call('HDEL', KEYS[1], 'refresh', 'refresh_expires_ms')
redis.call('DEL', KEYS[2])
return 1
"""
