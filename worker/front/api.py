"""The HTTP service (``notify api``): a Concur v4 gateway for partner apps, message status, and
the failed-notification endpoints for operators; an ASGI app on Starlette, served by uvicorn.

* ``POST /messages/{userId}/session`` takes exactly Concur's v4 request and queues it (202);
  the ``Concur-Company-Id`` header names the message's company (absent: the default company),
  one the partner's key is granted (``NOTIFY_PARTNER_COMPANIES``; else 403, never queued) and
  the registry holds connected (else 422).
  ``Idempotency-Key`` makes the partner's key, not the whole request, say what "the same
  message" is (another request under a key already used: 409); ``Expires-At`` is its deadline.
* ``POST /messages/batch`` takes up to 500 such messages (a JSON array of v4 bodies, each with its
  ``userId``), validates each on its own and records the valid ones in one Redis round trip:
  202, or 207 when any was refused, with one result per message in order.
* ``GET /messages/{id}`` shows a message's status and attempts; ``DELETE /messages/{id}``
  cancels it while it is not being or has not been posted (409 once it is).
* ``GET /notifications?status=failed`` and ``GET|DELETE /notifications/{id}``,
  ``POST /notifications/{id}/replay``, ``POST /notifications/replay`` serve the dead letters in
  the shape of Concur's "Get Notifications by Status" (JSON or XML by ``Accept``).
* ``GET /companies``, ``GET|PUT|DELETE /companies/{companyId}``: the company registry for
  operators (``CompanyEndpoints``; connecting asks Concur through ``worker.concur.companies``).
* ``/healthz``, ``/readyz``, ``/metrics`` (Prometheus: fleet-wide counts without a key, and the
  per-partner series only with an operator key), ``/openapi.json``.

Every error is the seed's ``ErrorMessage``. Redis calls block, so they run off the event loop: the
gateway's through the intake thread, in groups (``worker.intake.intake``), the others in the thread
pool. Keys arrive only in the ``Authorization`` header, which no log line carries. A wrong key
counts
toward the failure limits (``worker.front.guard``): past them, key checks answer 429.
"""

from __future__ import annotations

import dataclasses
import functools
import hmac
import json
import logging
import math
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_to_bytes, urlencode

from kombu.exceptions import OperationalError as BrokerError
from pydantic import BaseModel, ValidationError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from werkzeug.datastructures import MIMEAccept
from werkzeug.http import parse_accept_header

from worker.concur import companies
from worker.front import notifications
from worker.front.bodies import BodyTooLarge, BodyTooSlow, read_body
from worker.front.console import console_routes
from worker.front.guard import FailureLimiter, FailureLimits, client_address
from worker.front.openapi import openapi_document
from worker.front.stats import PROMETHEUS_CONTENT_TYPE, collect, render_prometheus
from worker.intake.intake import Intake
from worker.intake.producer import IdempotencyConflict, prepare, record_admitted, submit_many
from worker.ops.logs import configure_from_settings
from worker.ops.monitoring import init_sentry
from worker.ops.tracing import enqueue_span, instrument_app
from worker.rules import deadlines
from worker.rules.grants import NO_GRANTS, CompanyGrants, not_granted
from worker.rules.retries import ANSWERING
from worker.rules.validation import InvalidRequest, Problem, company_problem, validate
from worker.runtime import Runtime
from worker.settings import Settings, get_settings
from worker.shapes.contract import (
    COMPANY_HEADER,
    DEFAULT_PAGE_LIMIT,
    EXPIRES_HEADER,
    HIGHEST_HTTP_STATUS,
    IDEMPOTENCY_HEADER,
    LOWEST_HTTP_STATUS,
    MAX_BATCH_MESSAGES,
    MAX_PAGE_LIMIT,
    MAX_REPLAY_RATE,
    REPLAYED_HEADER,
    Attempt,
    BatchAnswer,
    BatchQueued,
    BatchRefused,
    ClientStatus,
    CompanyList,
    CompanyView,
    ConnectCompany,
    Health,
    MessageStatus,
    Notification,
    NotificationList,
    Queued,
    Ready,
    Replayed,
    ReplayPreview,
    SetWebhook,
    WebhookDeadLetter,
    WebhookDeadLetterList,
    WebhookSecret,
    WebhookTestQueued,
    WebhookView,
)
from worker.shapes.models import (
    DEFAULT_COMPANY,
    ErrorItem,
    ErrorMessage,
    is_company_id,
    is_message_id,
    is_partner_name,
)
from worker.shapes.times import int_or_none, iso_utc
from worker.store.codec import StatusRecord, now_ms
from worker.store.companies import CompanyRegistry
from worker.store.query import (
    DeadLetterFilter,
    PageCursor,
    decode_cursor,
    encode_cursor,
    read_filter,
)

log = logging.getLogger(__name__)

# Stable errorCodes of our own (validation.py defines those of a bad request body).
UNAUTHORIZED = "UNAUTHORIZED"
FORBIDDEN = "FORBIDDEN"
NOT_FOUND = "NOT_FOUND"
METHOD_NOT_ALLOWED = "METHOD_NOT_ALLOWED"
NOT_ACCEPTABLE = "NOT_ACCEPTABLE"
PAYLOAD_TOO_LARGE = "PAYLOAD_TOO_LARGE"
REQUEST_TIMEOUT = "REQUEST_TIMEOUT"
TOO_MANY_FAILURES = "TOO_MANY_FAILURES"
UNSUPPORTED_MEDIA_TYPE = "UNSUPPORTED_MEDIA_TYPE"
INVALID_HEADER = "INVALID_HEADER"
INVALID_PARAMETER = "INVALID_PARAMETER"
UNSUPPORTED_STATUS = "UNSUPPORTED_STATUS"
SERVICE_UNAVAILABLE = "SERVICE_UNAVAILABLE"
INVALID_BATCH = "INVALID_BATCH"  # a bulk body that is not an array of 1..500 messages
TOO_MANY_MESSAGES = "TOO_MANY_MESSAGES"  # a bulk body of more than 500
INTERNAL_ERROR = "INTERNAL_ERROR"
IDEMPOTENCY_KEY_REUSED = "IDEMPOTENCY_KEY_REUSED"
NOT_CANCELLABLE = "NOT_CANCELLABLE"

PARTNER = "partner"
OPERATOR = "operator"

# A bulk request's item that is not a JSON object: refused alone, as any invalid message is.
NOT_AN_OBJECT = InvalidRequest(
    [Problem("body", "INVALID_FIELD", "each message must be a JSON object: a v4 body and userId")]
)

# What a refused filter value (``read_filter``) is told, by its name there.
_FILTER_ERRORS = {
    "since": "since must be an ISO-8601 date-time",
    "until": "until must be an ISO-8601 date-time",
    "http_status": (
        f"httpStatus must be an HTTP status {LOWEST_HTTP_STATUS}..{HIGHEST_HTTP_STATUS}"
    ),
}

_AUTH_SCHEMES = ("bearer", "oauth")  # OAuth: the scheme in Concur's legacy examples
JSON_TYPE = "application/json"
# What JSON answers say they are: the seed's own Content-Type (JSON is UTF-8 anyway; ours is
# ASCII-escaped).
JSON_CONTENT_TYPE = f"{JSON_TYPE}; charset=utf-8"
XML_TYPE = "application/xml"
# What an Accept header can choose, in the server's order of preference: on a tie in quality
# and specificity the first wins (RFC 9110 12.5.1 leaves ties to the server), so JSON.
_OFFERS = {JSON_TYPE: "json", XML_TYPE: "xml", "text/xml": "xml"}

# state in Redis -> the status a client sees. An attempt in progress is still "queued" from
# the client's view (it may yet be retried); the raw state is shown alongside.
STATUS_OF_STATE: dict[str, ClientStatus] = {
    "queued": "queued",
    "inflight": "queued",
    "retrying": "retrying",
    "delivered": "delivered",
    "failed": "failed",
    "cancelled": "cancelled",
}


class ApiError(Exception):
    """An answer in the seed's error schema: HTTP status, one or more (code, message)."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        headers: dict[str, str] | None = None,
        problems: list[Problem] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.items = [(p.code, p.message) for p in problems] if problems else [(code, message)]
        self.headers = headers or {}


@dataclass(frozen=True, slots=True)
class ServicePolicy:
    """What the HTTP service needs from the settings: keys, body limit, public URL."""

    gateway_keys: tuple[tuple[bytes, str], ...]  # (key, partner name)
    operator_keys: tuple[bytes, ...]
    max_body_bytes: int
    body_timeout_seconds: float
    public_url: str | None
    failure_limits: FailureLimits
    grants: CompanyGrants = NO_GRANTS  # NOTIFY_PARTNER_COMPANIES
    max_batch_body_bytes: int = 4 * 1024 * 1024  # NOTIFY_SERVICE_MAX_BATCH_BODY_BYTES

    @classmethod
    def from_settings(cls, settings: Settings) -> ServicePolicy:
        """Read the service's part of the settings."""
        return cls(
            gateway_keys=tuple(
                (key.get_secret_value().encode(), partner)
                for partner, key in settings.gateway_partners
            ),
            operator_keys=tuple(k.get_secret_value().encode() for k in settings.operator_keys),
            max_body_bytes=settings.service_max_body_bytes,
            body_timeout_seconds=settings.service_body_timeout_seconds,
            public_url=settings.service_public_url,
            failure_limits=FailureLimits.from_settings(settings),
            grants=CompanyGrants.from_settings(settings),
            max_batch_body_bytes=settings.service_max_batch_body_bytes,
        )


# -- pure helpers --------------------------------------------------------------------------------


def presented_key(authorization: str | None) -> bytes | None:
    """The key in an ``Authorization: Bearer <key>`` (or ``OAuth <key>``) header, else None."""
    if not authorization:
        return None
    scheme, _, key = authorization.strip().partition(" ")
    key = key.strip()
    if scheme.lower() not in _AUTH_SCHEMES or not key:
        return None
    return key.encode("utf-8", "surrogateescape")


def _any_matches(given: bytes, keys: tuple[bytes, ...]) -> bool:
    # Compares with every key, without stopping at a match, in constant time per key.
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(given, key)
    return matched


def partner_of_key(given: bytes | None, policy: ServicePolicy) -> str | None:
    """The partner whose gateway key ``given`` is, or None."""
    if given is None:
        return None
    matched: str | None = None
    for key, partner in policy.gateway_keys:
        # Every key is compared, in constant time each; no key names two partners (settings).
        if hmac.compare_digest(given, key):
            matched = partner
    return matched


@dataclass(frozen=True, slots=True)
class Caller:
    """Who presented the request's key: its roles and, for a gateway key, its partner."""

    roles: frozenset[str]
    partner: str | None

    @property
    def operator(self) -> bool:
        """Operators see every partner's messages."""
        return OPERATOR in self.roles


def caller_of(given: bytes | None, policy: ServicePolicy) -> Caller:
    """The roles and partner a presented key grants."""
    partner = partner_of_key(given, policy)
    roles = set()
    if partner is not None:
        roles.add(PARTNER)
    if given is not None and _any_matches(given, policy.operator_keys):
        roles.add(OPERATOR)
    return Caller(frozenset(roles), partner)


def too_many_failures(retry_after: float) -> ApiError:
    """The 429 of a client (or everyone) past the failure limits."""
    return ApiError(
        429,
        TOO_MANY_FAILURES,
        "too many wrong keys lately; try again later",
        headers={"Retry-After": str(max(1, math.ceil(retry_after)))},
    )


def negotiate(accept: str | None) -> str | None:
    """``"json"`` or ``"xml"`` for an ``Accept`` header (JSON when absent or blank), None if
    it allows neither (406).

    Parsed and matched by werkzeug (quality, then specificity, then our order: JSON first); a
    range with a ``q`` that is not a number in 0..1 is dropped, as RFC 9110 says to ignore it.
    """
    if accept is None or not accept.strip():
        return "json"
    ranges = parse_accept_header(accept, MIMEAccept)
    # Media-type parameters (``application/json; charset=utf-8``) tell none of our answers
    # apart, yet werkzeug matches a range with parameters only to an offer with the same ones:
    # they are dropped, so such a range still chooses its type.
    bare = MIMEAccept([(value.partition(";")[0].strip(), quality) for value, quality in ranges])
    best = bare.best_match(_OFFERS)
    return None if best is None else _OFFERS[best]


def _iso_ms(ms: Any) -> str | None:
    return iso_utc(ms, millis=True)


def _text(value: Any) -> str | None:
    # A stored value shown as text: records hold what validated requests and attempts wrote,
    # so this only keeps an odd legacy value from failing the answer's model.
    if value is None or isinstance(value, str):
        return value
    return str(value)


def message_view(message_id: str, record: StatusRecord, base_url: str) -> MessageStatus:
    """A status record (``MessageStore.lookup``) as the ``GET /messages/{id}`` body."""
    request = record.request
    context = request.get("context")
    state = record.state
    return MessageStatus(
        id=message_id,
        status=STATUS_OF_STATE.get(state, "queued"),
        state=state,
        partner=record.partner,
        company=record.company,
        userId=_text(request.get("userId")),
        sessionId=_text(request.get("sessionId")),
        templateId=_text(request.get("templateId")),
        context=context if isinstance(context, dict) else {},
        attempts=[
            Attempt(
                number=int_or_none(entry.get("n")),
                at=_iso_ms(entry.get("at")),
                outcome=_text(entry.get("outcome")),
                httpStatus=int_or_none(entry.get("status")),
                cause=_text(entry.get("cause")),
                durationMs=int_or_none(entry.get("ms")),
                correlationId=_text(entry.get("cid")),
            )
            for entry in record.attempts
        ],
        correlationId=_text(record.get("cid")) or None,
        lastHttpStatus=int_or_none(record.get("status")),
        createdAt=_iso_ms(record.get("created")),
        updatedAt=_iso_ms(record.get("updated")),
        nextAttemptAt=_iso_ms(record.get("next")) if state == "retrying" else None,
        expiresAt=_iso_ms(record.get("exp")),
        replays=int_or_none(record.get("replays")) or 0,
        reason=_text(record.get("reason")) or None,
        notificationUri=(
            notifications.notification_uri(base_url, message_id) if state == "failed" else None
        ),
    )


# -- responses -----------------------------------------------------------------------------------


def json_response(
    content: Any, status: int = 200, headers: dict[str, str] | None = None
) -> Response:
    """A JSON response; ASCII-escaped, so any string (even a lone surrogate) encodes."""
    body = json.dumps(content, ensure_ascii=True, separators=(",", ":"), allow_nan=False)
    return Response(body.encode("ascii"), status, headers, media_type=JSON_CONTENT_TYPE)


def model_response(
    body: BaseModel, status: int = 200, headers: dict[str, str] | None = None
) -> Response:
    """A JSON answer built through its model (``worker.shapes.contract``), the one the OpenAPI
    document describes: a body that does not fit its description fails here, not at a client.

    A field left unset is left out: only keys that are absent unless given have defaults
    (``Replayed.ratePerSecond``); every other field is always passed, null or not.
    """
    return json_response(body.model_dump(exclude_unset=True), status, headers)


def error_response(error: ApiError) -> Response:
    """The seed's ``ErrorMessage``, one entry per problem, each with a fresh ``errorId``."""
    body = ErrorMessage(
        errors=[
            ErrorItem(errorId=str(uuid.uuid4()), errorCode=code, errorMessage=message)
            for code, message in error.items
        ]
    )
    return model_response(body, error.status, error.headers)


def _error_items(problems: list[Problem]) -> list[ErrorItem]:
    # One refused message of a bulk request: its problems as the seed's error items.
    return [
        ErrorItem(errorId=str(uuid.uuid4()), errorCode=p.code, errorMessage=p.message)
        for p in problems
    ]


def _xml_response(
    body: bytes, status: int = 200, headers: dict[str, str] | None = None
) -> Response:
    return Response(body, status, headers, media_type=f"{XML_TYPE}; charset=utf-8")


# -- the app -------------------------------------------------------------------------------------


class Service:
    """The endpoints, over one runtime and one policy."""

    def __init__(self, policy: ServicePolicy, runtime: Runtime, limiter: FailureLimiter) -> None:
        self.policy = policy
        self.runtime = runtime
        # Each group of requests is admitted (its companies' states read once) and recorded;
        # a request whose company is unknown or disconnected gets its own InvalidRequest.
        self.intake = Intake(functools.partial(record_admitted, runtime=runtime))
        self.limiter = limiter

    # helpers

    def _base_url(self, request: Request) -> str:
        # Never the request's Host header: a client could point NotificationURI, ObjectURI,
        # Link and the OpenAPI servers at a host of its choosing. Without a configured public
        # URL the URIs are relative ("/notifications/<id>").
        return self.policy.public_url or ""

    async def _caller(self, request: Request) -> Caller:
        # Who the request's key names. A blocked address (or everyone) is answered 429 before
        # any key is compared; a wrong key is counted, and may start such a block.
        given = presented_key(request.headers.get("authorization"))
        if given is None:
            return Caller(frozenset(), None)
        address = client_address(request)
        blocked = self.limiter.retry_after(address)
        if blocked is not None:
            raise too_many_failures(blocked)
        caller = caller_of(given, self.policy)
        if not caller.roles:
            blocked = await run_in_threadpool(self.limiter.record_failure, address)
            if blocked is not None:
                raise too_many_failures(blocked)
        return caller

    async def _require(self, request: Request, role: str, *, also: str | None = None) -> Caller:
        caller = await self._caller(request)
        roles = caller.roles
        if role in roles or (also is not None and also in roles):
            return caller
        if roles:
            raise ApiError(403, FORBIDDEN, f"this key does not grant the {role} role")
        raise ApiError(
            401,
            UNAUTHORIZED,
            "a valid key is required: Authorization: Bearer <key>",
            headers={"WWW-Authenticate": 'Bearer realm="notify"'},
        )

    @staticmethod
    def _id(request: Request, name: str = "id") -> str:
        value = str(request.path_params[name])
        # Anything but an id's form cannot exist and must not reach a Redis key name.
        if not is_message_id(value):
            raise ApiError(404, NOT_FOUND, "no such id")
        return value

    @staticmethod
    def _user_id(request: Request) -> str:
        """The ``{userId}`` path segment, decoded strictly as UTF-8.

        The server decodes the path leniently (invalid UTF-8 becomes U+FFFD), so ``%FF`` and
        ``%FE`` would be one user: the segment is decoded again from the raw path, strictly.
        """
        decoded = str(request.path_params["userId"])
        raw_path = request.scope.get("raw_path")
        if not isinstance(raw_path, bytes):
            return decoded
        segments = raw_path.split(b"?", 1)[0].split(b"/")
        if len(segments) < 3 or segments[-1] != b"session":
            return decoded
        try:
            unquote_to_bytes(segments[-2]).decode("utf-8")
        except UnicodeDecodeError:
            raise ApiError(
                400, "INVALID_USER_ID", "userId is not valid UTF-8 once percent-decoded"
            ) from None
        return decoded

    def _check_json_content_type(self, request: Request) -> None:
        raw = request.headers.get("content-type")
        if raw is None:
            raise ApiError(415, UNSUPPORTED_MEDIA_TYPE, "Content-Type: application/json required")
        media, *params = raw.split(";")
        if media.strip().lower() != JSON_TYPE:
            raise ApiError(415, UNSUPPORTED_MEDIA_TYPE, "Content-Type: application/json required")
        for param in params:
            name, _, value = param.partition("=")
            if name.strip().lower() == "charset" and value.strip().strip('"').lower() not in (
                "utf-8",
                "utf8",
            ):
                raise ApiError(415, UNSUPPORTED_MEDIA_TYPE, "the body must be UTF-8 JSON")

    async def _read_body(self, request: Request, limit: int | None = None) -> bytes:
        limit = self.policy.max_body_bytes if limit is None else limit
        declared = request.headers.get("content-length")
        if declared is not None and not declared.strip().isdigit():
            raise ApiError(400, INVALID_HEADER, "Content-Length is not a number")
        try:
            return await read_body(
                request, limit=limit, deadline_seconds=self.policy.body_timeout_seconds
            )
        except BodyTooLarge:
            raise ApiError(
                413, PAYLOAD_TOO_LARGE, f"the body is larger than {limit} bytes"
            ) from None
        except BodyTooSlow:
            raise ApiError(
                408,
                REQUEST_TIMEOUT,
                f"the body did not arrive within {self.policy.body_timeout_seconds:g} s",
                headers={"Connection": "close"},
            ) from None

    def _format(self, request: Request) -> str:
        chosen = negotiate(request.headers.get("accept"))
        if chosen is None:
            raise ApiError(406, NOT_ACCEPTABLE, f"supported Accept types: {', '.join(_OFFERS)}")
        return chosen

    @staticmethod
    def _status_param(request: Request, *, required: bool) -> None:
        status = request.query_params.get("status")
        if status is None and not required:
            return
        if status not in notifications.SUPPORTED_STATUSES:
            supported = ", ".join(notifications.SUPPORTED_STATUSES)
            raise ApiError(
                400, UNSUPPORTED_STATUS, f"status must be one of: {supported} (got {status!r})"
            )

    @staticmethod
    def _filter(request: Request) -> DeadLetterFilter:
        query = request.query_params
        partner = query.get("partner") or None
        if partner is not None and not is_partner_name(partner):
            raise ApiError(400, INVALID_PARAMETER, "partner is not a partner name")
        company = query.get("company") or None
        refused_company = company_problem(company)
        if refused_company is not None:
            raise ApiError(400, INVALID_PARAMETER, refused_company.message)
        selection, refused = read_filter(
            company=company,
            reason=query.get("reason"),
            template=query.get("template"),
            user=query.get("user"),
            partner=partner,
            since=query.get("since"),
            until=query.get("until"),
            http_status=query.get("httpStatus"),
        )
        if refused:
            raise ApiError(400, INVALID_PARAMETER, _FILTER_ERRORS[refused[0]])
        return selection

    @staticmethod
    def _int_param(request: Request, name: str, default: int, low: int, high: int) -> int:
        raw = request.query_params.get(name)
        if raw is None:
            return default
        if not raw.isascii() or not raw.isdigit() or not low <= int(raw) <= high:
            raise ApiError(400, INVALID_PARAMETER, f"{name} must be an integer {low}..{high}")
        return int(raw)

    @staticmethod
    def _cursor(request: Request) -> PageCursor | None:
        # Opaque text from a previous page's X-Next-Cursor (or Link); absent: the first page.
        raw = request.query_params.get("cursor")
        if raw is None:
            return None
        after = decode_cursor(raw)
        if after is None:
            raise ApiError(
                400, INVALID_PARAMETER, "cursor must be a previous page's X-Next-Cursor, unchanged"
            )
        return after

    # gateway

    def _company(self, request: Request, caller: Caller) -> str | None:
        """The company the ``Concur-Company-Id`` header names (None: absent, the default
        company), once the caller's key is granted it; 400 for a value that names none, 403
        for a company not granted (before the body is read: nothing of it is queued)."""
        values = request.headers.getlist(COMPANY_HEADER)
        if not values:
            return None
        company = values[0].strip()
        if len(values) > 1 or company_problem(company) is not None:
            raise ApiError(
                400,
                INVALID_HEADER,
                f"{COMPANY_HEADER} must be given once, as a company UUID in lower case "
                f"(or {DEFAULT_COMPANY!r})",
            )
        partner = caller.partner
        if not self.policy.grants.allows(partner, company):
            assert partner is not None  # unkeyed callers are refused by _require
            log.info(
                "partner %s named company %s, not granted to it: 403",
                partner,
                company,
                extra={"partner": partner, "company": company},
            )
            problem = not_granted(partner, company)
            raise ApiError(403, problem.code, problem.message)
        return company

    @staticmethod
    def _one_header(request: Request, name: str) -> str | None:
        values = request.headers.getlist(name)
        if len(values) > 1:
            raise ApiError(400, INVALID_HEADER, f"{name} must be given at most once")
        return values[0] if values else None

    def _deadline(self, request: Request) -> int | None:
        """The ``Expires-At`` header as epoch ms (None: absent); 400 for a value that is not
        an RFC 3339 date-time with a time zone."""
        text = self._one_header(request, EXPIRES_HEADER)
        if text is None:
            return None
        deadline = deadlines.parse_deadline(text)
        if isinstance(deadline, Problem):
            raise ApiError(400, deadline.code, f"{EXPIRES_HEADER}: {deadline.message}")
        return deadline

    async def submit(self, request: Request) -> Response:
        """``POST /messages/{userId}/session``: validate and queue a v4 request."""
        caller = await self._require(request, PARTNER)
        company = self._company(request, caller)
        idempotency_key = self._one_header(request, IDEMPOTENCY_HEADER)
        expires_ms = self._deadline(request)
        self._check_json_content_type(request)
        raw = await self._read_body(request)
        body = _json_body(raw)
        user_id = self._user_id(request)
        try:
            # Pure and cached: cheaper here than a hop to a thread.
            # The partner is part of the id and the idempotency key: the same request from two
            # partners is two messages, and neither can pre-empt the other's.
            message = validate(
                user_id, body, self.runtime.allowlist, partner=caller.partner, company=company
            )
            message = prepare(
                message,
                runtime=self.runtime,
                expires_ms=expires_ms,
                idempotency_key=idempotency_key,
            )
        except InvalidRequest as error:
            raise ApiError(400, "", "", problems=error.problems) from None
        # Tracing on: a notify.enqueue span under the request's, which the message carries.
        with enqueue_span(1, message.id) as trace:
            if trace is not None:
                message = dataclasses.replace(message, trace=trace)
            try:
                created, state = await self.intake.record(message)
            except InvalidRequest as error:  # its company is unknown or disconnected
                raise ApiError(422, "", "", problems=error.problems) from None
            except IdempotencyConflict as conflict:
                raise ApiError(
                    409,
                    IDEMPOTENCY_KEY_REUSED,
                    f"{IDEMPOTENCY_HEADER} was used for another request within its window: "
                    f"message {conflict.existing_id}; nothing was queued",
                    headers={"Location": f"/messages/{conflict.existing_id}"},
                ) from None
        status = "queued" if created else STATUS_OF_STATE.get(state, "queued")
        headers = {"Location": f"/messages/{message.id}"}
        if idempotency_key is not None and not created:
            headers[REPLAYED_HEADER] = "true"
        return model_response(
            Queued(id=message.id, status=status, duplicate=not created), 202, headers
        )

    async def submit_batch(self, request: Request) -> Response:
        """``POST /messages/batch``: validate each of up to 500 messages on its own and queue
        the valid ones, all recorded in one Redis round trip.

        202 when every message was accepted, 207 when any was refused (the body says which:
        one result per message, in order, its id or its errors). The request as a whole is
        refused as the one-message route refuses it (key, ``Concur-Company-Id`` and its grant,
        Content-Type, body size: ``NOTIFY_SERVICE_MAX_BATCH_BODY_BYTES``), and with 400 when
        the body is not a JSON array of messages, 413 when it holds more than 500, 422 when its
        company is unknown or disconnected: then nothing of it is queued.
        """
        caller = await self._require(request, PARTNER)
        company = self._company(request, caller)
        expires_ms = self._deadline(request)
        self._check_json_content_type(request)
        raw = await self._read_body(request, limit=self.policy.max_batch_body_bytes)
        document = _json_body(raw)
        if not isinstance(document, list) or not document:
            raise ApiError(
                400,
                INVALID_BATCH,
                f"the body must be a JSON array of 1..{MAX_BATCH_MESSAGES} messages, each a v4 "
                "request body with its userId",
            )
        if len(document) > MAX_BATCH_MESSAGES:
            raise ApiError(
                413,
                TOO_MANY_MESSAGES,
                f"{len(document)} messages in one request; at most {MAX_BATCH_MESSAGES}",
            )
        # Each message is the v4 body plus its userId; one that is not an object is refused
        # alone, here, and the others go through the producer's bulk path.
        objects = [(index, item) for index, item in enumerate(document) if isinstance(item, dict)]
        requests = [
            (item.get("userId"), {key: value for key, value in item.items() if key != "userId"})
            for _, item in objects
        ]
        try:
            outcomes = await run_in_threadpool(
                functools.partial(
                    submit_many,
                    requests,
                    runtime=self.runtime,
                    partner=caller.partner,
                    company=company,
                    expires_ms=expires_ms,
                )
            )
        except InvalidRequest as error:  # its company is unknown or disconnected
            raise ApiError(422, "", "", problems=error.problems) from None
        answered = dict(zip((index for index, _ in objects), outcomes, strict=True))
        results: list[BatchQueued | BatchRefused] = []
        for index in range(len(document)):
            outcome = answered.get(index, NOT_AN_OBJECT)
            if isinstance(outcome, InvalidRequest):
                results.append(BatchRefused(index=index, errors=_error_items(outcome.problems)))
            else:
                status = (
                    "queued"
                    if not outcome.duplicate
                    else STATUS_OF_STATE.get(outcome.state, "queued")
                )
                results.append(
                    BatchQueued(
                        index=index, id=outcome.id, status=status, duplicate=outcome.duplicate
                    )
                )
        refused = sum(isinstance(result, BatchRefused) for result in results)
        answer = BatchAnswer(accepted=len(results) - refused, refused=refused, results=results)
        return model_response(answer, 207 if refused else 202)

    async def cancel_message(self, request: Request) -> Response:
        """``DELETE /messages/{id}``: cancel a message not yet posted (200 with its status);
        409 once an attempt is under way or over; 404 for another partner's."""
        caller = await self._require(request, PARTNER, also=OPERATOR)
        message_id = self._id(request)
        # The partner check is inside the same atomic step as the cancel: another partner's
        # message is "no such message", exactly as for GET.
        partner = None if caller.operator else caller.partner
        verdict, state = await run_in_threadpool(
            functools.partial(self.runtime.store.cancel, message_id, partner=partner)
        )
        if verdict == "missing":
            raise ApiError(404, NOT_FOUND, "no such message (unknown, or its status expired)")
        if verdict == "refused":
            being = "being posted" if state == "inflight" else state
            raise ApiError(
                409, NOT_CANCELLABLE, f"the message is {being}: it can no longer be cancelled"
            )
        log.info(
            "message %s cancelled (was %s)",
            message_id,
            state,
            extra={"message_id": message_id, "partner": caller.partner},
        )
        record = await run_in_threadpool(self.runtime.store.lookup, message_id)
        if record is None:  # deleted in the meantime: still cancelled, never posted
            raise ApiError(404, NOT_FOUND, "no such message (unknown, or its status expired)")
        return model_response(message_view(message_id, record, self._base_url(request)))

    async def message_status(self, request: Request) -> Response:
        """``GET /messages/{id}``: the message's status and attempts."""
        caller = await self._require(request, PARTNER, also=OPERATOR)
        message_id = self._id(request)
        record = await run_in_threadpool(self.runtime.store.lookup, message_id)
        # Another partner's message is "no such message", exactly as an unknown id: a 403 would
        # tell a partner which ids exist. Operators see every partner's.
        if record is None or not (caller.operator or record.partner == caller.partner):
            if record is not None:
                log.info(
                    "partner %s asked for message %s of another partner: 404",
                    caller.partner,
                    message_id,
                    extra={"partner": caller.partner, "message_id": message_id},
                )
            raise ApiError(404, NOT_FOUND, "no such message (unknown, or its status expired)")
        return model_response(message_view(message_id, record, self._base_url(request)))

    # failed notifications

    async def list_notifications(self, request: Request) -> Response:
        """``GET /notifications?status=failed``: a page of dead letters, newest first."""
        await self._require(request, OPERATOR)
        fmt = self._format(request)
        self._status_param(request, required=True)
        selection = self._filter(request)
        limit = self._int_param(request, "limit", DEFAULT_PAGE_LIMIT, 1, MAX_PAGE_LIMIT)
        after = self._cursor(request)
        store = self.runtime.deadletters
        page = await run_in_threadpool(
            functools.partial(store.page, selection, after=after, limit=limit)
        )
        base = self._base_url(request)
        headers: dict[str, str] = {}
        if page.next_cursor is not None:
            next_cursor = encode_cursor(page.next_cursor)
            query = {key: value for key, value in request.query_params.items() if key != "cursor"}
            query.update(cursor=next_cursor, limit=str(limit))
            headers["Link"] = f'<{base}/notifications?{urlencode(query)}>; rel="next"'
            headers["X-Next-Cursor"] = next_cursor
        if fmt == "xml":
            return _xml_response(
                notifications.notification_list_xml(page.items, base), 200, headers
            )
        listed = [notifications.notification_dict(item, base) for item in page.items]
        return model_response(NotificationList.model_validate(listed), 200, headers)

    async def show_notification(self, request: Request) -> Response:
        """``GET /notifications/{id}``: one failed notification."""
        await self._require(request, OPERATOR)
        fmt = self._format(request)
        letter_id = self._id(request)
        letter = await run_in_threadpool(self.runtime.deadletters.get, letter_id)
        if letter is None:
            raise ApiError(404, NOT_FOUND, "no such failed notification")
        base = self._base_url(request)
        if fmt == "xml":
            return _xml_response(notifications.notification_xml(letter, base))
        return model_response(
            Notification.model_validate(notifications.notification_dict(letter, base))
        )

    async def delete_notification(self, request: Request) -> Response:
        """``DELETE /notifications/{id}``: remove one failed notification (204)."""
        await self._require(request, OPERATOR)
        letter_id = self._id(request)
        if not await run_in_threadpool(self.runtime.deadletters.delete, letter_id):
            raise ApiError(404, NOT_FOUND, "no such failed notification")
        return Response(status_code=204)

    async def replay_notification(self, request: Request) -> Response:
        """``POST /notifications/{id}/replay``: send it back through the pipeline (202)."""
        await self._require(request, OPERATOR)
        letter_id = self._id(request)
        envelope = await run_in_threadpool(self.runtime.deadletters.replay, letter_id)
        if envelope is None:
            raise ApiError(404, NOT_FOUND, "no such failed notification")
        return model_response(
            Queued(id=letter_id, status="queued", duplicate=False),
            202,
            {"Location": f"/messages/{letter_id}"},
        )

    async def replay_many(self, request: Request) -> Response:
        """``POST /notifications/replay?<filters>[&dryRun=true][&rate=N]``: replay the selected.

        ``dryRun=true`` answers 200 with what would be replayed and changes nothing. ``rate``
        paces the redrive (replays a second); it then runs after the answer (202 with the ids
        selected), in this process: one that stops midway leaves the rest as dead letters.
        """
        await self._require(request, OPERATOR)
        self._status_param(request, required=False)
        selection = self._filter(request)
        store = self.runtime.deadletters
        query = request.query_params
        if query.get("dryRun") not in (None, "true", "false"):
            raise ApiError(400, INVALID_PARAMETER, "dryRun must be true or false")
        rate = query.get("rate")
        rate_per_second = None
        if rate is not None:
            try:
                rate_per_second = float(rate)
            except ValueError:
                rate_per_second = -1.0
            if not (0 < rate_per_second < MAX_REPLAY_RATE):
                raise ApiError(400, INVALID_PARAMETER, "rate must be a positive number")
        if query.get("dryRun") == "true":
            ids = await run_in_threadpool(store.select, selection)
            return model_response(ReplayPreview(count=len(ids), ids=ids, dryRun=True), 200)
        if rate_per_second is None:
            ids = await run_in_threadpool(store.replay_many, selection)
            return model_response(Replayed(count=len(ids), ids=ids), 202)
        ids = await run_in_threadpool(store.select, selection)
        paced = BackgroundTask(store.replay_ids, ids, rate_per_second=rate_per_second)
        response = model_response(
            Replayed(count=len(ids), ids=ids, ratePerSecond=rate_per_second), 202
        )
        response.background = paced
        return response

    # operations

    async def healthz(self, request: Request) -> Response:
        """``GET /healthz``: the process is up."""
        return model_response(Health(status="ok"))

    async def readyz(self, request: Request) -> Response:
        """``GET /readyz``: Redis answers a PING."""
        try:
            await run_in_threadpool(self.runtime.redis.ping)
        except Exception:  # any failure to PING means "not ready", whatever its kind
            raise ApiError(503, SERVICE_UNAVAILABLE, "Redis does not answer") from None
        return model_response(Ready(status="ready"))

    async def metrics(self, request: Request) -> Response:
        """``GET /metrics``: the operators' counts in the Prometheus text format.

        Without a key, the fleet-wide counts only: partner names and volumes are for operators,
        so the per-partner series need an operator key (a wrong key is a 401, as anywhere).
        """
        with_partners = request.headers.get("authorization") is not None
        if with_partners:
            await self._require(request, OPERATOR)
        snapshot = await run_in_threadpool(collect, self.runtime)
        if not with_partners:
            snapshot = dataclasses.replace(snapshot, partners={})
        return Response(render_prometheus(snapshot), media_type=PROMETHEUS_CONTENT_TYPE)

    async def openapi(self, request: Request) -> Response:
        """``GET /openapi.json``: this service's OpenAPI 3 document."""
        return json_response(openapi_document(self._base_url(request) or "/"))


# -- companies (issue 21): the registry over the operator API ----------------------------------

CONCUR_REFUSED = "CONCUR_REFUSED"
CONCUR_UNAVAILABLE = "CONCUR_UNAVAILABLE"
NOT_CONFIGURED = "NOT_CONFIGURED"


def _json_body(raw: bytes) -> Any:
    """A request body as JSON; 400 ``INVALID_JSON`` when it is not UTF-8 or not valid JSON."""
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as error:
        what = "UTF-8" if isinstance(error, UnicodeDecodeError) else "valid JSON"
        raise ApiError(400, "INVALID_JSON", f"the body is not {what}") from None


def _body_problems(error: ValidationError) -> list[Problem]:
    # Never the input: the body holds a secret token.
    problems = []
    for item in error.errors(include_input=False, include_url=False):
        field = ".".join(str(part) for part in item.get("loc", ())) or "body"
        message = str(item.get("msg", "invalid")).removeprefix("Value error, ")
        problems.append(Problem(field, "INVALID_BODY", f"{field}: {message}"))
    return problems


class CompanyEndpoints:
    """``/companies``: list, show, connect and disconnect companies (operator key)."""

    def __init__(self, service: Service, settings: Settings) -> None:
        self.service = service
        self.settings = settings
        self.registry = CompanyRegistry.from_settings(service.runtime.redis, settings)

    @staticmethod
    def _company_id(request: Request, *, default_allowed: bool) -> str:
        value = str(request.path_params["companyId"])
        if value == DEFAULT_COMPANY and not default_allowed:
            raise ApiError(
                400,
                INVALID_PARAMETER,
                "the default company comes from the settings (NOTIFY_API_TOKEN or "
                "NOTIFY_OAUTH_*): change them to change it",
            )
        if value != DEFAULT_COMPANY and not is_company_id(value):
            raise ApiError(
                400,
                INVALID_PARAMETER,
                "companyId must be the company's UUID in lower case (or `default`)",
            )
        return value

    async def list_companies(self, request: Request) -> Response:
        """``GET /companies``: every company, the default one first."""
        await self.service._require(request, OPERATOR)
        listed = await run_in_threadpool(companies.listing, self.settings, self.registry)
        return model_response(
            CompanyList(companies=[CompanyView.model_validate(each.to_dict()) for each in listed])
        )

    async def show_company(self, request: Request) -> Response:
        """``GET /companies/{companyId}``: one company."""
        await self.service._require(request, OPERATOR)
        company_id = self._company_id(request, default_allowed=True)
        found = await run_in_threadpool(companies.find, self.settings, self.registry, company_id)
        if found is None:
            raise ApiError(404, NOT_FOUND, "no such company")
        return model_response(CompanyView.model_validate(found.to_dict()))

    async def connect_company(self, request: Request) -> Response:
        """``PUT /companies/{companyId}``: connect (or reconnect) a company with a request
        token or a refresh token; Concur refusing it is a 502 and stores nothing."""
        await self.service._require(request, OPERATOR)
        company_id = self._company_id(request, default_allowed=False)
        self.service._check_json_content_type(request)
        raw = await self.service._read_body(request)
        document = _json_body(raw)
        try:
            body = ConnectCompany.model_validate(document)
        except ValidationError as error:
            raise ApiError(400, "", "", problems=_body_problems(error)) from None
        try:
            config = companies.client_config(self.settings)
        except companies.NotConfigured as error:
            raise ApiError(503, NOT_CONFIGURED, str(error)) from None
        try:
            company = await run_in_threadpool(
                functools.partial(
                    companies.connect,
                    self.registry,
                    config,
                    company_id,
                    request_token=body.requestToken,
                    refresh_token=body.refreshToken,
                )
            )
        except companies.ConnectError as error:
            log.warning("company %s not connected: %s", company_id, error)
            code = CONCUR_REFUSED if error.refused else CONCUR_UNAVAILABLE
            raise ApiError(502, code, str(error)) from None
        except ValueError as error:
            raise ApiError(400, INVALID_PARAMETER, str(error)) from None
        log.info(
            "company %s connected (%s), geolocation %s",
            company_id,
            company.reason,
            company.geolocation,
            extra={"company": company_id},
        )
        return model_response(CompanyView.model_validate(company.to_dict()))

    async def disconnect_company(self, request: Request) -> Response:
        """``DELETE /companies/{companyId}``: disconnect a company (its refresh token deleted)."""
        await self.service._require(request, OPERATOR)
        company_id = self._company_id(request, default_allowed=False)
        gone = await run_in_threadpool(self.registry.disconnect, company_id, now_ms())
        if gone is None:
            raise ApiError(404, NOT_FOUND, "no such company")
        log.info("company %s disconnected", company_id, extra={"company": company_id})
        return model_response(CompanyView.model_validate(gone.to_dict()))


def company_routes(service: Service, settings: Settings) -> list[Route]:
    """The ``/companies`` routes, for the service's route list."""
    endpoints = CompanyEndpoints(service, settings)
    one = "/companies/{companyId}"
    return [
        Route("/companies", _handle(endpoints.list_companies), methods=["GET"]),
        Route(one, _handle(endpoints.show_company), methods=["GET"]),
        Route(one, _handle(endpoints.connect_company), methods=["PUT"]),
        Route(one, _handle(endpoints.disconnect_company), methods=["DELETE"]),
    ]


# -- partners' outcome webhooks (docs/webhooks.md) over the operator API -----------------------


class WebhookEndpoints:
    """``/partners/{partner}/webhook`` and ``/webhooks/failed`` (operator key)."""

    def __init__(self, service: Service, settings: Settings) -> None:
        from worker.store.webhooks import WebhookStore
        from worker.webhooks.delivery import WebhookPolicy

        self.service = service
        self.settings = settings
        self.store = WebhookStore.from_settings(service.runtime.redis, settings)
        self.breaker_policy = WebhookPolicy.from_settings(settings).breaker

    @staticmethod
    def _partner(request: Request) -> str:
        value = str(request.path_params["partner"])
        if not is_partner_name(value):
            raise ApiError(400, INVALID_PARAMETER, "partner must be a partner name")
        return value

    def _view(self, config: Any) -> WebhookView:
        from worker.rules.endpoints import EndpointRefused, check_url
        from worker.webhooks.delivery import EndpointBreaker

        try:
            name = check_url(config.url, allow_private=True).name
        except EndpointRefused:
            name = "refused"
        state = EndpointBreaker(self.store.redis, self.breaker_policy, name).status().state
        return WebhookView.model_validate({**config.to_json(), "breaker": state})

    async def _found(self, partner: str) -> Any:
        config = await run_in_threadpool(self.store.get, partner)
        if config is None:
            raise ApiError(404, NOT_FOUND, "the partner has no webhook")
        return config

    async def show(self, request: Request) -> Response:
        """``GET /partners/{partner}/webhook``: the webhook, never its secret."""
        await self.service._require(request, OPERATOR)
        config = await self._found(self._partner(request))
        return model_response(await run_in_threadpool(self._view, config))

    async def put(self, request: Request) -> Response:
        """``PUT /partners/{partner}/webhook``: set it; answers the signing secret."""
        from worker.rules.endpoints import EndpointRefused, check_url
        from worker.store.webhooks import NoSealingKey

        await self.service._require(request, OPERATOR)
        partner = self._partner(request)
        self.service._check_json_content_type(request)
        raw = await self.service._read_body(request)
        document = _json_body(raw)
        try:
            body = SetWebhook.model_validate(document)
        except ValidationError as error:
            raise ApiError(400, "", "", problems=_body_problems(error)) from None
        try:
            check_url(body.url, allow_private=self.settings.webhook_allow_private)
        except EndpointRefused as error:
            raise ApiError(400, "URL_REFUSED", error.detail) from None
        try:
            config, secret = await run_in_threadpool(
                self.store.set, partner, body.url, body.events or []
            )
        except NoSealingKey as error:
            raise ApiError(503, NOT_CONFIGURED, str(error)) from None
        log.info("webhook of partner %s set", partner, extra={"partner": partner})
        view = await run_in_threadpool(self._view, config)
        return model_response(WebhookSecret(webhook=view, secret=secret))

    async def remove(self, request: Request) -> Response:
        """``DELETE /partners/{partner}/webhook``: 204."""
        await self.service._require(request, OPERATOR)
        partner = self._partner(request)
        if not await run_in_threadpool(self.store.remove, partner):
            raise ApiError(404, NOT_FOUND, "the partner has no webhook")
        log.info("webhook of partner %s removed", partner, extra={"partner": partner})
        return Response(status_code=204)

    async def rotate(self, request: Request) -> Response:
        """``POST /partners/{partner}/webhook/rotate``: a new secret; the old one signs too for
        the grace period."""
        from worker.store.webhooks import NoSealingKey

        await self.service._require(request, OPERATOR)
        partner = self._partner(request)
        try:
            secret = await run_in_threadpool(self.store.rotate, partner)
        except KeyError:
            raise ApiError(404, NOT_FOUND, "the partner has no webhook") from None
        except NoSealingKey as error:
            raise ApiError(503, NOT_CONFIGURED, str(error)) from None
        log.info("webhook secret of partner %s rotated", partner, extra={"partner": partner})
        view = await run_in_threadpool(self._view, await self._found(partner))
        return model_response(WebhookSecret(webhook=view, secret=secret))

    async def test(self, request: Request) -> Response:
        """``POST /partners/{partner}/webhook/test``: queue a ``webhook.test`` event (202)."""
        await self.service._require(request, OPERATOR)
        partner = self._partner(request)
        try:
            event_id = await run_in_threadpool(self.store.test_event, partner)
        except KeyError:
            raise ApiError(404, NOT_FOUND, "the partner has no webhook") from None
        return model_response(WebhookTestQueued(eventId=event_id), 202)

    async def failed(self, request: Request) -> Response:
        """``GET /webhooks/failed``: webhook dead letters, newest first."""
        await self.service._require(request, OPERATOR)
        partner = request.query_params.get("partner")
        if partner is not None and not is_partner_name(partner):
            raise ApiError(400, INVALID_PARAMETER, "partner must be a partner name")
        limit = self.service._int_param(request, "limit", DEFAULT_PAGE_LIMIT, 1, MAX_PAGE_LIMIT)
        letters = await run_in_threadpool(
            functools.partial(self.store.dead_letters, limit=limit, partner=partner)
        )
        return model_response(
            WebhookDeadLetterList(
                items=[WebhookDeadLetter.model_validate(each.to_json()) for each in letters]
            )
        )


def webhook_routes(service: Service, settings: Settings) -> list[Route]:
    """The webhook routes, for the service's route list."""
    endpoints = WebhookEndpoints(service, settings)
    one = "/partners/{partner}/webhook"
    return [
        Route(one, _handle(endpoints.show), methods=["GET"]),
        Route(one, _handle(endpoints.put), methods=["PUT"]),
        Route(one, _handle(endpoints.remove), methods=["DELETE"]),
        Route(one + "/rotate", _handle(endpoints.rotate), methods=["POST"]),
        Route(one + "/test", _handle(endpoints.test), methods=["POST"]),
        Route("/webhooks/failed", _handle(endpoints.failed), methods=["GET"]),
    ]


def _handle(endpoint: Callable[[Request], Awaitable[Response]]) -> Callable[..., Any]:
    # Turns ApiError into the error schema; Redis or broker outages into 503.
    @functools.wraps(endpoint)
    async def wrapped(request: Request) -> Response:
        try:
            return await endpoint(request)
        except ApiError as error:
            return error_response(error)
        except (RedisConnectionError, RedisTimeoutError, BrokerError) as error:
            log.warning("503: Redis or the broker is unavailable (%s)", type(error).__name__)
            return error_response(
                ApiError(503, SERVICE_UNAVAILABLE, "the queue is unavailable; try again later")
            )

    return wrapped


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = {404: NOT_FOUND, 405: METHOD_NOT_ALLOWED}.get(exc.status_code, INVALID_PARAMETER)
    headers = dict(exc.headers) if exc.headers else None
    return error_response(ApiError(exc.status_code, code, str(exc.detail), headers=headers))


async def _server_error(request: Request, exc: Exception) -> Response:
    return error_response(ApiError(500, INTERNAL_ERROR, "internal error"))


def create_app(settings: Settings | None = None, runtime: Runtime | None = None) -> Starlette:
    """The ASGI app; by default over the process settings and runtime."""
    if settings is None:
        settings = get_settings()
        # Each `notify api --workers N` child builds its app here: give it the same JSON logs and
        # Sentry as the parent (both are idempotent).
        configure_from_settings(settings)
        init_sentry(settings)
    if runtime is None:
        # A partner or an operator waits for each answer: while Redis is away, a 503 after 2 s
        # (they may send again: submissions are idempotent), not a request held for 30.
        runtime = Runtime.from_settings(settings, redis_patience=ANSWERING)
    policy = ServicePolicy.from_settings(settings)
    # One per process: the API's key checks and the console's logins count and see the same.
    limiter = FailureLimiter(runtime.redis, policy.failure_limits)
    service = Service(policy, runtime, limiter)
    routes = [
        Route("/messages/{userId}/session", _handle(service.submit), methods=["POST"]),
        Route("/messages/batch", _handle(service.submit_batch), methods=["POST"]),
        Route("/messages/{id}", _handle(service.message_status), methods=["GET"]),
        Route("/messages/{id}", _handle(service.cancel_message), methods=["DELETE"]),
        Route("/notifications", _handle(service.list_notifications), methods=["GET"]),
        Route("/notifications/replay", _handle(service.replay_many), methods=["POST"]),
        Route("/notifications/{id}", _handle(service.show_notification), methods=["GET"]),
        Route("/notifications/{id}", _handle(service.delete_notification), methods=["DELETE"]),
        Route("/notifications/{id}/replay", _handle(service.replay_notification), methods=["POST"]),
        Route("/healthz", _handle(service.healthz), methods=["GET"]),
        Route("/readyz", _handle(service.readyz), methods=["GET"]),
        Route("/metrics", _handle(service.metrics), methods=["GET"]),
        Route("/openapi.json", _handle(service.openapi), methods=["GET"]),
        *company_routes(service, settings),  # /companies: the company registry (issue 21)
        *webhook_routes(service, settings),  # partners' outcome webhooks (issue 22)
        *console_routes(settings, runtime, limiter),  # /console: the dead-letter console
    ]
    app = Starlette(
        routes=routes,
        exception_handlers={HTTPException: _http_error, Exception: _server_error},
    )
    # A trailing slash is a 404 in the error schema, not a redirect a POST cannot follow.
    app.router.redirect_slashes = False
    instrument_app(app)  # a server span per request, when OTEL_* turn tracing on
    return app


@functools.cache
def _default_app() -> Starlette:
    return create_app()


def __getattr__(name: str) -> Any:
    # ``uvicorn worker.front.api:app`` works, yet importing this module reads no settings.
    if name == "app":
        return _default_app()
    raise AttributeError(name)
