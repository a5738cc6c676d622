"""The console's sessions: a cookie signed by itsdangerous, the logged-in state in Redis.

* Before login the cookie holds only a CSRF token for the login form (signed; nothing stored:
  an anonymous visitor writes nothing to Redis).
* Logging in starts a session: a random id in the cookie (signed), and in Redis
  (``keys.console_session``) its CSRF token, the operator's key fingerprint, when it started
  and when it was last used. Every request that finds it moves "last used" on; unused for
  ``NOTIFY_CONSOLE_IDLE_SECONDS`` it is over (and Redis drops the key itself about then), and
  after ``LIFETIME_SECONDS`` it is over whatever its use. Logging out deletes it, so the cookie,
  replayed, opens nothing.

The signing secret comes from the caller (derived from the operator keys, so every process
accepts the same cookies and changing the keys ends every session).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from itsdangerous import BadSignature, URLSafeTimedSerializer

from worker.store import keys

LIFETIME_SECONDS = 8 * 3600
_SALT = "notify console session v2"
_MAX_COOKIE_CHARS = 4096


@dataclass(frozen=True, slots=True)
class Session:
    """What one request's cookie stands for: a CSRF token and, once logged in, who."""

    csrf: str
    operator: str | None = None
    session_id: str | None = None

    @property
    def logged_in(self) -> bool:
        """Whether this is an operator's session (not just a login form's token)."""
        return self.operator is not None


@dataclass(frozen=True, slots=True)
class SessionPolicy:
    """How long a session lasts: unused, and at most."""

    idle_seconds: int
    lifetime_seconds: int = LIFETIME_SECONDS


def session_alive(fields: dict[str, str], now: float, policy: SessionPolicy) -> bool:
    """Whether a stored session (its Redis hash) may still be used at ``now`` (epoch seconds)."""
    try:
        started, seen = float(fields["started"]), float(fields["seen"])
    except (KeyError, ValueError):
        return False
    return now - seen <= policy.idle_seconds and now - started <= policy.lifetime_seconds


class Sessions:
    """Reads and writes the console's sessions (blocking: Redis; call from a thread)."""

    def __init__(
        self,
        redis: Any,
        secret: bytes,
        policy: SessionPolicy,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.redis = redis
        self.policy = policy
        self.clock = clock
        self.serializer = URLSafeTimedSerializer(secret, salt=_SALT)

    @staticmethod
    def anonymous() -> Session:
        """A login form's session: a fresh CSRF token, nothing stored."""
        return Session(csrf=secrets.token_urlsafe(32))

    def cookie(self, session: Session) -> str:
        """The signed cookie value for ``session``."""
        if session.session_id is not None:
            return self.serializer.dumps({"sid": session.session_id})
        return self.serializer.dumps({"csrf": session.csrf})

    def read(self, cookie: str | None) -> Session | None:
        """The session a cookie stands for, or None (unsigned, expired, ended, unknown)."""
        if not cookie or len(cookie) > _MAX_COOKIE_CHARS:
            return None
        try:
            payload = self.serializer.loads(cookie, max_age=self.policy.lifetime_seconds)
        except BadSignature:  # SignatureExpired is one
            return None
        if not isinstance(payload, dict):
            return None
        if isinstance(payload.get("csrf"), str) and "sid" not in payload:
            return Session(csrf=payload["csrf"])
        session_id = payload.get("sid")
        if not isinstance(session_id, str):
            return None
        key = keys.console_session(session_id)
        fields = self.redis.hgetall(key)
        now = self.clock()
        if not fields or not session_alive(fields, now, self.policy):
            if fields:
                self.redis.delete(key)
            return None
        pipe = self.redis.pipeline(transaction=False)
        pipe.hset(key, "seen", repr(now))
        pipe.expire(key, self.policy.idle_seconds)
        pipe.execute()
        return Session(csrf=fields["csrf"], operator=fields["op"], session_id=session_id)

    def start(self, operator: str) -> Session:
        """A new logged-in session (new id, new CSRF token: no fixation) for ``operator``."""
        session_id = secrets.token_urlsafe(32)
        session = Session(csrf=secrets.token_urlsafe(32), operator=operator, session_id=session_id)
        key = keys.console_session(session_id)
        now = repr(self.clock())
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(key, mapping={"csrf": session.csrf, "op": operator, "started": now, "seen": now})
        pipe.expire(key, self.policy.idle_seconds)
        pipe.execute()
        return session

    def end(self, session: Session) -> None:
        """End a logged-in session: its cookie opens nothing from now on."""
        if session.session_id is not None:
            self.redis.delete(keys.console_session(session.session_id))


__all__ = ["LIFETIME_SECONDS", "Session", "SessionPolicy", "Sessions", "session_alive"]
