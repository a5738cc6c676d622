"""Sentry: what is reported, and how secrets are kept out of it.

Reported: records logged at ERROR or above (exhausted retries, token refresh failures, a mover
that cannot reach Redis) and unhandled exceptions (bugs), including those raised in a Celery
task. Not reported: retries and dead letters for a 4xx, which are logged at INFO / WARNING and
only ride along as breadcrumbs.

``scrub`` (the ``before_send`` hook) replaces the values of sensitive keys (Authorization,
cookies, tokens, passwords, keys, DSNs) and redacts bearer tokens and every known secret value in
every string of the event, so a token reaches Sentry neither in headers, nor in a request body,
nor in an exception message or a local variable.
"""

from __future__ import annotations

import logging
from typing import Any

from worker.ops.logs import add_secret, redact, settings_secrets
from worker.settings import Settings

FILTERED = "[Filtered]"
_SENSITIVE_KEYS = (
    "authorization",
    "cookie",
    "token",
    "secret",
    "password",
    "passwd",
    "api_key",
    "apikey",
    "dsn",
    "credential",
    "basic_auth",
    "private_key",
    "encryption_key",
    "x-api-key",
)
# Extras of our log lines that are worth searching and grouping by in Sentry.
_TAGGED_EXTRAS = ("reason", "template_id", "outcome")


def _sensitive(key: Any) -> bool:
    lowered = str(key).lower()
    return any(word in lowered for word in _SENSITIVE_KEYS)


def _scrub_value(value: Any, depth: int = 0) -> Any:
    if depth > 30:  # a deeply nested event is cut rather than walked forever
        return FILTERED
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {
            key: FILTERED if _sensitive(key) and item else _scrub_value(item, depth + 1)
            for key, item in value.items()
        }
    if isinstance(value, list):
        # Sentry sends headers as [name, value] pairs in places.
        if len(value) == 2 and isinstance(value[0], str) and _sensitive(value[0]):
            return [value[0], FILTERED]
        return [_scrub_value(item, depth + 1) for item in value]
    if isinstance(value, tuple):
        return tuple(_scrub_value(list(value), depth + 1))
    return value


def scrub(event: dict[str, Any], hint: dict[str, Any] | None = None) -> dict[str, Any]:
    """Sentry ``before_send``: the event without secrets, our extras promoted to tags."""
    cleaned: dict[str, Any] = _scrub_value(event)
    extra = cleaned.get("extra")
    if isinstance(extra, dict):
        tags = cleaned.setdefault("tags", {})
        if isinstance(tags, dict):
            for key in _TAGGED_EXTRAS:
                if isinstance(extra.get(key), str):
                    tags.setdefault(key, extra[key])
    return cleaned


def init_sentry(settings: Settings) -> bool:
    """Start the Sentry SDK when ``NOTIFY_SENTRY_DSN`` is set; returns whether it did."""
    dsn = settings.sentry_dsn.get_secret_value().strip() if settings.sentry_dsn else ""
    if not dsn:
        return False
    import sentry_sdk
    from sentry_sdk.integrations.celery import CeleryIntegration
    from sentry_sdk.integrations.logging import LoggingIntegration

    add_secret(*settings_secrets(settings))
    sentry_sdk.init(
        dsn=dsn,
        integrations=[
            CeleryIntegration(),
            LoggingIntegration(level=logging.INFO, event_level=logging.ERROR),
        ],
        before_send=scrub,  # type: ignore[arg-type]
        before_breadcrumb=_scrub_breadcrumb,
        environment=settings.sentry_environment,
        traces_sample_rate=settings.sentry_traces_sample_rate,
        send_default_pii=False,
        # Frame locals can hold a token under any name (an OAuth response, a header dict);
        # scrubbing by key name and known value cannot promise to catch them all.
        include_local_variables=False,
    )
    return True


def _scrub_breadcrumb(crumb: dict[str, Any], hint: dict[str, Any] | None = None) -> dict[str, Any]:
    cleaned: dict[str, Any] = _scrub_value(crumb)
    return cleaned
