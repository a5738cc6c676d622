"""Logging for every process: one JSON object per line, with secrets redacted.

``configure_logging`` installs one handler on the root logger; Celery's own loggers, ours
(``notify.*``) and the libraries' all propagate to it, so everything goes through the same
formatter and the same redaction. Fields passed with ``extra=`` become top-level JSON keys.

Redaction is belt and braces: no code should log a token, but if one ever does (an exception
message, a repr of headers), the filter replaces ``Bearer <...>``, ``OAuth <...>``, OAuth token
fields, URL passwords and every known secret value (the ``SecretStr`` settings, the Redis
password, values registered at run time with ``add_secret``, and the latest tokens
``worker.concur.oauth`` fetches or reads back, with ``add_runtime_secret``) by ``[REDACTED]`` before
the line is written.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
from collections import deque
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from pydantic import SecretStr

from worker.settings import Settings

REDACTED = "[REDACTED]"
# Shorter values are not redacted by value: they would match ordinary words.
MIN_SECRET_LENGTH = 6

_BEARER = re.compile(r"(?i)\b(bearer)(\s+)[A-Za-z0-9\-._~+/=]+")
# Concur's legacy "Authorization: OAuth <token>" scheme. "OAuth" is also an ordinary word ("OAuth
# token refresh failed"), so only a token-like run of 16+ characters after it is taken.
_OAUTH_SCHEME = re.compile(r"(?i)\b(oauth)(\s+)[A-Za-z0-9\-._~+/=]{16,}")
_TOKEN_FIELD = re.compile(
    r"(?i)(\b(?:access_token|refresh_token|id_token|password|client_secret)\b"
    r"[\"']?\s*[:=]\s*[\"']?)([^\"'&\s,}]+)"
)
_DSN_AUTH = re.compile(r"(\b[a-z][a-z0-9+.-]*://)([^/@\s:]*:)?[^/@\s]+@")
# What each rule above needs to find before it can match. Almost no line holds any of these, and
# one scan for them costs a fraction of running every rule (the per-attempt line is logged for
# every message, with eight fields, so this is on the hot path).
_SUSPECT = re.compile(
    r"(?i)bearer|oauth|access_token|refresh_token|id_token|password|client_secret|://"
)

# The attributes every LogRecord has; anything else on a record came from ``extra=``.
# (uvicorn's ``color_message`` repeats the message with terminal colour codes.)
_STANDARD = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys()
    | {"message", "asctime", "color_message"}
)

_secrets: set[str] = set()
MAX_RUNTIME_SECRETS = 32
_runtime_secrets: deque[str] = deque(maxlen=MAX_RUNTIME_SECRETS)
_secrets_lock = threading.Lock()
# Every secret value, longest first (so no partial leftovers), replaced one after another: a
# substring search per value costs less than one regular expression of them all (measured 4x
# less with 40 values), and a new value costs a sort of a few dozen instead of a compilation
# (7 ms each, which a worker serving a thousand companies paid thousands of times).
_ordered_secrets: tuple[str, ...] = ()


def add_secret(*values: str | None) -> None:
    """Redact these values wherever they appear in a log line or a Sentry event from now on."""
    fresh = {v for v in values if v and len(v) >= MIN_SECRET_LENGTH}
    if not fresh - _secrets:
        return
    with _secrets_lock:
        _secrets.update(fresh)
        _compile()


def add_runtime_secret(*values: str | None) -> None:
    """Like ``add_secret``, for tokens fetched at run time: only the latest few are kept.

    An access token is replaced every hour and a rotated refresh token is retired, so a
    process would otherwise collect thousands, and every log line is scanned for all of them.
    """
    fresh = [v for v in values if v and len(v) >= MIN_SECRET_LENGTH]
    if not fresh or all(v in _runtime_secrets for v in fresh):
        return
    with _secrets_lock:
        for value in fresh:
            if value not in _runtime_secrets:
                _runtime_secrets.append(value)
        _compile()


def _compile() -> None:
    # Called with the lock held; longest first, so no partial leftovers.
    global _ordered_secrets
    _ordered_secrets = tuple(sorted(_secrets | set(_runtime_secrets), key=len, reverse=True))


def settings_secrets(settings: Settings) -> list[str]:
    """Every secret value the settings hold: each ``SecretStr`` field and the Redis password."""
    found: list[str] = []
    for name in type(settings).model_fields:
        value = getattr(settings, name)
        items: Iterable[Any] = value if isinstance(value, list | tuple | set) else (value,)
        for item in items:
            if isinstance(item, SecretStr):
                secret = item.get_secret_value()
                found.append(secret)
                # "user:password" (Flower) and a DSN's key: the parts alone are secret too.
                _, colon, after = secret.partition(":")
                if colon and "://" not in secret:
                    found.append(after)
                key = urlsplit(secret).username if "://" in secret else None
                if key:
                    found.append(key)
    password = urlsplit(settings.redis_url).password
    if password:
        found.append(password)
    return [value for value in found if value]


def redact(text: str) -> str:
    """``text`` with bearer tokens, OAuth token fields, URL credentials and secrets replaced."""
    for secret in _ordered_secrets:
        if secret in text:
            text = text.replace(secret, REDACTED)
    if _SUSPECT.search(text) is None:
        return text
    text = _BEARER.sub(rf"\1\2{REDACTED}", text)
    text = _OAUTH_SCHEME.sub(rf"\1\2{REDACTED}", text)
    text = _TOKEN_FIELD.sub(rf"\1{REDACTED}", text)
    return _DSN_AUTH.sub(rf"\1{REDACTED}@", text)


def _redact_value(value: Any) -> Any:
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {key: _redact_value(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_redact_value(item) for item in value]
    return value


class RedactingFilter(logging.Filter):
    """Rewrites a record's message, extra fields and exception text without secrets."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Redact in place; never drops a record."""
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: keep what there is, redacted
            message = f"{record.msg} {record.args}"
        cleaned = redact(message)
        if cleaned != message:
            # Only then: an untouched template and args let Sentry group alike lines together.
            record.msg, record.args = cleaned, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            # Formatters use exc_text when set; exc_info stays for Sentry (its before_send scrubs).
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        for key, value in list(vars(record).items()):
            if key not in _STANDARD:
                setattr(record, key, _redact_value(value))
        return True


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, dict):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_jsonable(item) for item in value]
    return repr(value)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, extra fields, exception."""

    def format(self, record: logging.LogRecord) -> str:
        """Render ``record`` as a single line of JSON."""
        doc: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in doc and not key.startswith("_"):
                doc[key] = _jsonable(value)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            doc["exception"] = record.exc_text
        if record.stack_info:
            doc["stack"] = record.stack_info
        return json.dumps(doc, ensure_ascii=False, default=repr)


class TextFormatter(logging.Formatter):
    """Human-readable lines for a terminal, extra fields appended as ``key=value``."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        """The classic line, then the extra fields."""
        line = super().format(record)
        extras = [
            f"{key}={value}"
            for key, value in vars(record).items()
            if key not in _STANDARD and not key.startswith("_")
        ]
        if not extras:
            return line
        head, newline, rest = line.partition("\n")
        return f"{head} {' '.join(extras)}{newline}{rest}"


_HANDLER_NAME = "notify"
# Filters every handler installed here also runs (tracing's trace ids: worker.ops.tracing).
_extra_filters: list[logging.Filter] = []


def add_log_filter(extra: logging.Filter) -> None:
    """Run ``extra`` on every record the installed handler (and any later one) writes."""
    _extra_filters.append(extra)
    for handler in logging.getLogger().handlers:
        if handler.get_name() == _HANDLER_NAME:
            handler.addFilter(extra)


def remove_log_filter(extra: logging.Filter) -> None:
    """Undo ``add_log_filter``."""
    if extra in _extra_filters:
        _extra_filters.remove(extra)
    for handler in logging.getLogger().handlers:
        handler.removeFilter(extra)


def configure_logging(
    level: str | int = "INFO", json: bool = True, settings: Settings | None = None
) -> logging.Handler:
    """Send every logger's records to stderr through one formatter and the redacting filter.

    Idempotent: a second call replaces the handler it installed before. ``settings`` adds its
    secret values to the redaction list.
    """
    if settings is not None:
        add_secret(*settings_secrets(settings))
    root = logging.getLogger()
    for existing in list(root.handlers):
        if existing.get_name() == _HANDLER_NAME:
            root.removeHandler(existing)
    handler = logging.StreamHandler(sys.stderr)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(JsonFormatter() if json else TextFormatter())
    handler.addFilter(RedactingFilter())
    for extra in _extra_filters:
        handler.addFilter(extra)
    root.addHandler(handler)
    root.setLevel(level)
    # httpx logs every request at INFO ("HTTP Request: POST ..."), and Celery every task's
    # receipt and success; our per-attempt line says the same with the message id, so keep
    # only their warnings. (Measured: these lines were a tenth of a worker's CPU per message.)
    for noisy in ("httpx", "httpcore", "celery.app.trace", "celery.worker.strategy"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return handler


def configure_from_settings(settings: Settings, default_level: str | int = "INFO") -> None:
    """``configure_logging`` with ``NOTIFY_LOG_FORMAT`` / ``NOTIFY_LOG_LEVEL``."""
    configure_logging(
        settings.log_level or default_level,
        json=settings.log_format == "json",
        settings=settings,
    )
