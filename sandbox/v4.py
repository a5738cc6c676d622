"""The Notifications v4 contract the sandbox plays, as pure functions (no I/O, no state).

What a request must look like (:func:`user_id_of`, :func:`bearer`, :func:`validate_body`), the
seed's ErrorMessage ``{"errors": [{"errorId", "errorCode", "errorMessage"}]}``
(:func:`error_json`), and what the sandbox answers (:class:`Answer`, :func:`planned_answer`).
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any
from urllib.parse import unquote

from sandbox.plans import Plan

__all__ = [
    "JSON",
    "Answer",
    "bearer",
    "error_answer",
    "error_json",
    "json_answer",
    "planned_answer",
    "reason",
    "token_sha",
    "user_id_of",
    "validate_body",
]

JSON = "application/json"
_BODY_KEYS = frozenset({"sessionId", "templateId", "context"})
# Codes the seed uses where HTTPStatus' own name would differ from what clients match on.
_ERROR_CODES = {
    400: "INVALID_BODY",
    413: "PAYLOAD_TOO_LARGE",
    415: "UNSUPPORTED_MEDIA_TYPE",
}


# Correlation and error ids must be unique UUIDv4s, not unguessable: drawn from a private
# generator (seeded from the OS), a third of uuid4()'s cost on the hot path.
_random_bits = random.Random().getrandbits
_UUID4_CLEAR = ~((0xC000 << 48) | (0xF000 << 64))
_UUID4_SET = (0x8000 << 48) | (4 << 76)  # the RFC 4122 variant and version 4


def _new_id() -> str:
    digits = f"{_random_bits(128) & _UUID4_CLEAR | _UUID4_SET:032x}"
    return f"{digits[:8]}-{digits[8:12]}-{digits[12:16]}-{digits[16:20]}-{digits[20:]}"


@dataclass(slots=True)
class Answer:
    """What one request gets: an HTTP answer after ``delay`` seconds, or a ``fault``.

    ``fault`` is ``"hang"`` (hold the request until the client gives up), ``"drop"`` (close the
    connection without a word) or ``"garbled"`` (bytes that are not HTTP, then close).
    """

    status: int
    body: bytes = b""
    content_type: str | None = None
    headers: list[tuple[str, str]] = field(default_factory=list)
    delay: float = 0.0
    fault: str | None = None
    correlation_id: str = field(default_factory=_new_id)

    def head(self) -> list[tuple[bytes, bytes]]:
        """The response headers, ASGI style; every answer carries a fresh correlation id."""
        headers = [(b"concur-correlationid", self.correlation_id.encode("latin-1"))]
        if self.content_type:
            headers.append((b"content-type", self.content_type.encode("latin-1")))
        headers.extend(
            (name.encode("latin-1"), value.encode("latin-1")) for name, value in self.headers
        )
        headers.append((b"content-length", str(len(self.body)).encode("latin-1")))
        return headers


def token_sha(token: str) -> str:
    """The first 12 hex digits of the token's SHA-256: what records show instead of the token."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()[:12]


def _error_code(status: int) -> str:
    if status in _ERROR_CODES:
        return _ERROR_CODES[status]
    try:
        return HTTPStatus(status).name
    except ValueError:
        return f"HTTP_{status}"


def reason(status: int) -> str:
    """The status' reason phrase, for messages."""
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


def error_json(status: int, *messages: str, code: str | None = None) -> bytes:
    """The seed's ErrorMessage body: one error per message, each with a fresh errorId."""
    errors = [
        {"errorId": _new_id(), "errorCode": code or _error_code(status), "errorMessage": message}
        for message in messages
    ]
    return json.dumps({"errors": errors}).encode()


def error_answer(status: int, *messages: str, code: str | None = None) -> Answer:
    """An ErrorMessage answer (see :func:`error_json`)."""
    return Answer(status, error_json(status, *messages, code=code), JSON)


def json_answer(status: int, doc: Any) -> Answer:
    """A JSON answer, formatted as ``json.dumps`` does by default (clients grep it)."""
    return Answer(status, json.dumps(doc).encode(), JSON)


def user_id_of(raw_path: str, base_path: str) -> str | None:
    """The userId of ``{base_path}/messages/{userId}/session``, or None for any other path.

    Matched on the path as sent, so a percent-encoded ``/`` (``%2F``) stays inside the userId.
    """
    prefix = base_path + "/messages/"
    if not raw_path.startswith(prefix) or not raw_path.endswith("/session"):
        return None
    segment = raw_path[len(prefix) : -len("/session")]
    if not segment or "/" in segment:
        return None
    return unquote(segment)


def bearer(value: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` value; None when it is not one."""
    if value is None:
        return None
    parts = value.split()
    if len(parts) != 2 or parts[0].lower() != "bearer":
        return None
    return parts[1]


def validate_body(body: bytes) -> tuple[list[str], str | None]:
    """One message per schema problem, plus the templateId when there is a usable one."""
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        return ["request body is not valid JSON"], None
    if not isinstance(doc, dict):
        return ["request body must be a JSON object"], None
    problems: list[str] = []
    for name in ("sessionId", "templateId"):
        if name not in doc:
            problems.append(f"{name} is required")
        elif not isinstance(doc[name], str):
            problems.append(f"{name} must be a string")
        elif not doc[name].strip():
            problems.append(f"{name} must not be empty")
    if "context" not in doc:
        problems.append("context is required")
    elif not isinstance(doc["context"], dict):
        problems.append("context must be an object")
    elif "url" in doc["context"] and not isinstance(doc["context"]["url"], str):
        problems.append("context.url must be a string")
    problems.extend(f"unknown field: {name}" for name in sorted(set(doc) - _BODY_KEYS))
    template = doc.get("templateId")
    return problems, template if isinstance(template, str) else None


def planned_answer(plan: Plan) -> Answer:
    """The answer a script planned: its body, or an ErrorMessage for a 3xx-5xx without one."""
    fault = "hang" if plan.hang else "drop" if plan.drop else "garbled" if plan.garbled else None
    answer = Answer(plan.status, fault=fault, delay=plan.delay_ms / 1000.0)
    if plan.body is not None:
        answer.body = plan.body.encode("utf-8")
        answer.content_type = plan.content_type or JSON
    elif plan.errors is not None:
        errors = [
            {"errorId": _new_id(), **e} if "errorId" not in e else dict(e) for e in plan.errors
        ]
        answer.body = json.dumps({"errors": errors}).encode()
        answer.content_type = plan.content_type or JSON
    elif plan.status >= 300:
        answer.body = error_json(plan.status, f"scripted {plan.status} {reason(plan.status)}")
        answer.content_type = plan.content_type or JSON
    elif plan.content_type is not None:
        answer.content_type = plan.content_type
    if plan.retry_after is not None:
        answer.headers.append(("retry-after", plan.retry_after))
    return answer
