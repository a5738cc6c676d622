"""Standard Webhooks signatures, made by the ``standardwebhooks`` package.

The signed content is ``{webhook-id}.{webhook-timestamp}.{body}``, HMAC-SHA256 under the secret
(``whsec_`` + base64 of 32 random bytes here; the spec allows 24 to 64), base64, prefixed
``v1,``. While a rotated-out secret is still in its grace period, the header carries one
signature per secret, separated by spaces, the current one first; a receiver accepts the event
when any of them verifies.
"""

from __future__ import annotations

import base64
import secrets
from collections.abc import Sequence
from datetime import UTC, datetime

from standardwebhooks import Webhook

SECRET_PREFIX = "whsec_"
SECRET_BYTES = 32


def new_secret() -> str:
    """A new signing secret: ``whsec_`` and the base64 of 32 random bytes."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode("ascii")


def is_secret(value: str) -> bool:
    """Whether ``value`` has the form of a signing secret (``whsec_`` + base64, 24-64 bytes)."""
    if not value.startswith(SECRET_PREFIX):
        return False
    try:
        raw = base64.b64decode(value[len(SECRET_PREFIX) :], validate=True)
    except ValueError:
        return False
    return 24 <= len(raw) <= 64


def signature_header(
    signing_secrets: Sequence[str], event_id: str, timestamp: int, body: str
) -> str:
    """The ``webhook-signature`` value: ``v1,<sig>`` for each secret, separated by spaces."""
    if not signing_secrets:
        raise ValueError("an event is signed with at least one secret")
    at = datetime.fromtimestamp(timestamp, tz=UTC)
    return " ".join(
        Webhook(secret).sign(msg_id=event_id, timestamp=at, data=body) for secret in signing_secrets
    )


def headers(
    signing_secrets: Sequence[str], event_id: str, timestamp: int, body: str
) -> dict[str, str]:
    """The three Standard Webhooks headers of one attempt (``timestamp``: its Unix seconds)."""
    return {
        "webhook-id": event_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signature_header(signing_secrets, event_id, timestamp, body),
    }
