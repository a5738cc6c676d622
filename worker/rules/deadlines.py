"""A message's deadline: when it is given, how it is read, and a partner's default (pure).

A deadline is epoch milliseconds. It comes from the caller (``tasks.enqueue(…, expires_at=)``,
``notify send --expires-at``, the gateway's ``Expires-At`` header: an RFC 3339 date-time with a
time zone), else from the partner's default (``NOTIFY_PARTNER_EXPIRY_SECONDS``: seconds after
intake), else there is none. A deadline that has already passed when the message is accepted is
refused (``INVALID_DEADLINE``): nothing would ever be posted. Past its deadline a message is never
posted and becomes a dead letter ``expired`` (``worker.delivery.ends``).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime

from worker.rules.validation import Problem
from worker.settings import ANY_PARTNER

INVALID_DEADLINE = "INVALID_DEADLINE"
FIELD = "expiresAt"


def deadline_of(value: datetime) -> int | Problem:
    """A caller's deadline as epoch ms, or the problem with it (a time without a time zone
    could mean any of 24 instants)."""
    if value.tzinfo is None or value.utcoffset() is None:
        return Problem(FIELD, INVALID_DEADLINE, f"{FIELD} must have a time zone (like ...Z)")
    return int(value.timestamp() * 1000)


def parse_deadline(text: str) -> int | Problem:
    """An RFC 3339 date-time with a time zone (``2026-12-01T10:00:00Z``) as epoch ms, or the
    problem with it."""
    try:
        value = datetime.fromisoformat(text.strip())
    except ValueError:
        return Problem(
            FIELD,
            INVALID_DEADLINE,
            f"{FIELD} must be an RFC 3339 date-time with a time zone, like 2026-12-01T10:00:00Z",
        )
    return deadline_of(value)


def future_deadline(deadline_ms: int, *, now_ms: int) -> Problem | None:
    """Why a caller's deadline cannot be taken (None: it is still ahead)."""
    if deadline_ms <= now_ms:
        return Problem(FIELD, INVALID_DEADLINE, f"{FIELD} has already passed")
    return None


def default_deadline(
    partner: str, expiry_seconds: Mapping[str, float], *, now_ms: int
) -> int | None:
    """The deadline a partner's message gets when its caller gives none (None: no deadline):
    its own entry of ``NOTIFY_PARTNER_EXPIRY_SECONDS``, else the ``*`` entry."""
    seconds = expiry_seconds.get(partner, expiry_seconds.get(ANY_PARTNER))
    return None if seconds is None else now_ms + int(seconds * 1000)
