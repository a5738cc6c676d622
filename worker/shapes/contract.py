"""The HTTP service's answers and the limits of its parameters, as pydantic models and constants.

``worker.front.api`` builds every JSON answer through these models and ``worker.front.openapi``
generates the document's schemas from them, so an answer and its description cannot drift apart: a
key the gateway adds, drops or retypes fails the model (``extra="forbid"``, strict) before it
reaches a client. The request body and the error body are the seed's (``worker.shapes.models``); the
failed list follows Concur's "Get Notifications by Status" (``worker.front.notifications`` builds
its dicts and the XML). Pure: no I/O, nothing above ``worker.shapes.models``.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, RootModel, model_validator
from pydantic.config import JsonDict
from pydantic.json_schema import SkipJsonSchema

from worker.shapes.models import (
    COMPANY_ID_PATTERN,
    DEFAULT_COMPANY,
    MAX_ID_LENGTH,
    MESSAGE_ID_PATTERN,
    PARTNER_PATTERN,
    CompanyState,
    ErrorItem,
    SendRequest,
    schema_pattern,
)

# Paging of the failed list: a page is at most MAX_PAGE_LIMIT dead letters.
DEFAULT_PAGE_LIMIT = 50
MAX_PAGE_LIMIT = 1000
# A page's cursor is opaque text (worker.store.query.encode_cursor: unpadded URL-safe base64 of
# the last letter's time and id); no cursor we give is longer.
CURSOR_PATTERN = "^[A-Za-z0-9_-]+$"
MAX_CURSOR_LENGTH = 120
# The httpStatus filter: a status an HTTP answer can have.
LOWEST_HTTP_STATUS = 100
HIGHEST_HTTP_STATUS = 599
# A paced redrive's rate (replays a second), exclusive; past it pacing means nothing.
MAX_REPLAY_RATE = 1e6

# The status a client sees (worker.front.api maps the stored states onto these).
ClientStatus = Literal["queued", "retrying", "delivered", "failed", "cancelled"]

MessageId = Annotated[str, Field(pattern=schema_pattern(MESSAGE_ID_PATTERN))]
PartnerName = Annotated[str, Field(pattern=schema_pattern(PARTNER_PATTERN))]
# Times are written by worker.shapes.times (ISO-8601 UTC, "Z"); kept as text so the answer shows
# them exactly as written.
Timestamp = Annotated[str, Field(json_schema_extra={"format": "date-time"})]
UriReference = Annotated[str, Field(json_schema_extra={"format": "uri-reference"})]
# The failed list's EventDateTime, as the seed's example writes it: no offset, the time is UTC.
ConcurDateTime = Annotated[
    str,
    Field(
        pattern=r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}$",
        description="UTC, written without an offset as in Concur's example (`2012-11-14T19:45:25`)",
    ),
]

# Strict and closed: an answer with a key or a type the model does not describe is a bug.
_answer = ConfigDict(strict=True, extra="forbid")


class Queued(BaseModel):
    """``202`` of the gateway and of a single replay: the message's id and where it stands."""

    model_config = _answer
    id: MessageId
    status: ClientStatus
    duplicate: bool = Field(
        description="true: the same request (userId, sessionId, templateId, context.url, "
        "company), or the same Idempotency-Key with the same request, was submitted before by "
        "this partner; nothing new was queued and id is the first message's"
    )


# A company in a path, a header or an answer: ``default`` (the settings' company) or a company
# UUID.
COMPANY_NAME_PATTERN = f"^(?:{DEFAULT_COMPANY}|{COMPANY_ID_PATTERN.pattern})$"
CompanyName = Annotated[str, Field(pattern=COMPANY_NAME_PATTERN)]
# The gateway's request header naming the Concur company of a message (absent: the default
# company); beside the unchanged v4 path and body (docs/http-api.md).
COMPANY_HEADER = "Concur-Company-Id"
# The gateway's explicit idempotency key (docs/http-api.md, "Idempotency"): the same key and
# request give the same id, another request under the key within the window is a 409.
IDEMPOTENCY_HEADER = "Idempotency-Key"
# Answered with a 202 that found the key's earlier message (nothing new was queued).
REPLAYED_HEADER = "Idempotent-Replayed"
# The gateway's deadline header: an RFC 3339 date-time with a time zone; past it the message is
# never posted and becomes a dead letter ``expired``.
EXPIRES_HEADER = "Expires-At"


class Attempt(BaseModel):
    """One delivery attempt in a message's status."""

    model_config = _answer
    number: int | None
    at: Timestamp | None
    outcome: str | None
    httpStatus: int | None
    cause: str | None
    durationMs: int | None
    correlationId: str | None


class MessageStatus(BaseModel):
    """``GET /messages/{id}``: a message's status, request and attempts."""

    model_config = _answer
    id: MessageId
    status: ClientStatus
    state: str = Field(
        description="the internal state; `inflight` (an attempt in progress) shows as status "
        "`queued`"
    )
    partner: PartnerName
    company: CompanyName = Field(
        description="the Concur company the message is for: its UUID, or `default` (the company "
        "the settings define)"
    )
    userId: str | None
    sessionId: str | None
    templateId: str | None
    context: dict[str, object]
    attempts: list[Attempt]
    correlationId: str | None
    lastHttpStatus: int | None
    createdAt: Timestamp | None
    updatedAt: Timestamp | None
    nextAttemptAt: Timestamp | None
    expiresAt: Timestamp | None = Field(
        description="its deadline (Expires-At, or the partner's default): past it, it is never "
        "posted and becomes a dead letter `expired`; null: none"
    )
    replays: int
    reason: str | None
    notificationUri: UriReference | None


class FailureError(BaseModel):
    """One of Concur's ``errors`` on the last answer, in the failed list's PascalCase."""

    model_config = _answer
    ErrorId: str | None
    ErrorCode: str | None
    ErrorMessage: str | None


class Failure(BaseModel):
    """Why and how a notification failed (our addition to Concur's ``Notification``)."""

    model_config = _answer
    ReasonCode: str
    Detail: str | None
    HttpStatus: int | None
    Errors: list[FailureError]
    Attempts: int
    FirstAttemptDateTime: Timestamp | None
    LastAttemptDateTime: Timestamp | None
    CorrelationId: str | None
    UserId: str | None
    SessionId: str | None
    TemplateId: str | None
    Replays: int
    Partner: PartnerName
    Company: CompanyName


class Notification(BaseModel):
    """Concur's ``Notification`` element for one dead letter (fields in the seed's order).

    In XML a null is written as ``i:nil``; the JSON carries the same keys and values.
    """

    model_config = _answer
    Context: str | None
    EventDateTime: ConcurDateTime | None
    EventType: str
    NotificationURI: UriReference
    ObjectType: str = Field(description="always `NOTIFICATION`, as in Concur's examples")
    ObjectURI: UriReference
    Failure: Failure


class NotificationList(RootModel[list[Notification]]):
    """A page of the failed list: a plain list, as in Concur's examples (paging is in headers)."""


# -- bulk intake: POST /messages/batch ----------------------------------------------------------

# At most this many messages in one bulk request; more is refused whole (413, TOO_MANY_MESSAGES).
MAX_BATCH_MESSAGES = 500


class BatchMessage(SendRequest):
    """One message of a bulk request: the v4 body plus the ``userId`` the one-message route
    takes in its path."""

    model_config = ConfigDict(strict=True, extra="forbid", title="BatchMessage")
    userId: str = Field(min_length=1, max_length=MAX_ID_LENGTH)


class BatchRequest(RootModel[list[BatchMessage]]):
    """A bulk request's body: a JSON array of 1..500 messages, each validated on its own."""

    root: list[BatchMessage] = Field(min_length=1, max_length=MAX_BATCH_MESSAGES)


class BatchQueued(BaseModel):
    """A message of a bulk request that was accepted: queued, or a duplicate of one that was."""

    model_config = _answer
    index: int = Field(ge=0, description="its place in the request's array, from 0")
    id: MessageId
    status: ClientStatus
    duplicate: bool


class BatchRefused(BaseModel):
    """A message of a bulk request that was refused: nothing of it was queued."""

    model_config = _answer
    index: int = Field(ge=0, description="its place in the request's array, from 0")
    errors: list[ErrorItem] = Field(min_length=1)


class BatchAnswer(BaseModel):
    """``202``/``207`` of the bulk intake: one result per message, in the request's order."""

    model_config = _answer
    accepted: int = Field(ge=0, description="how many results are BatchQueued")
    refused: int = Field(ge=0, description="how many results are BatchRefused")
    results: list[BatchQueued | BatchRefused]


ReplayRate = Annotated[float, Field(gt=0, lt=MAX_REPLAY_RATE)]


def _no_default(schema: JsonDict) -> None:
    # A key that is absent unless given has no default worth documenting ("null" would be one).
    schema.pop("default", None)


class Replayed(BaseModel):
    """``202`` of the bulk replay: what was sent back (or, paced, is being sent)."""

    model_config = _answer
    count: int = Field(ge=0)
    ids: list[MessageId]
    # Only when paced; absent otherwise, never null (worker.front.api leaves unset fields out).
    ratePerSecond: ReplayRate | SkipJsonSchema[None] = Field(
        default=None, json_schema_extra=_no_default
    )


class ReplayPreview(BaseModel):
    """``200`` of the bulk replay with ``dryRun=true``: what would be replayed."""

    model_config = _answer
    count: int = Field(ge=0)
    ids: list[MessageId]
    dryRun: Literal[True]


class Health(BaseModel):
    """``GET /healthz``: the process is up."""

    model_config = _answer
    status: Literal["ok"]


class Ready(BaseModel):
    """``GET /readyz``: Redis answers."""

    model_config = _answer
    status: Literal["ready"]


# -- companies (issue 21) ------------------------------------------------------------------------

# The longest request or refresh token ``PUT /companies/{companyId}`` takes (Concur's are far
# shorter); a bound, so a body is never an unbounded secret.
MAX_COMPANY_TOKEN_LENGTH = 4096


class CompanyView(BaseModel):
    """One company: ``default`` (from the settings) or one of the registry (never its token)."""

    model_config = ConfigDict(strict=True, extra="forbid", title="Company")
    id: CompanyName
    state: CompanyState = Field(
        description="connected; needs_reconnect (Concur refused its refresh token: connect it "
        "again with a new request token); disconnected"
    )
    geolocation: str | None = Field(description="the base URL Concur named for the company")
    connectedAt: Timestamp | None
    refreshedAt: Timestamp | None = Field(description="when its refresh token last rotated")
    stateChangedAt: Timestamp | None
    refreshExpiresAt: Timestamp | None
    reason: str | None = Field(description="why the state last changed")
    fromSettings: bool = Field(
        description="true for `default`, the company NOTIFY_API_TOKEN or NOTIFY_OAUTH_* define"
    )


class CompanyList(BaseModel):
    """``GET /companies``: the default company first, then the registry's by id."""

    model_config = _answer
    companies: list[CompanyView]


def _exactly_one_token(schema: JsonDict) -> None:
    schema["oneOf"] = [{"required": ["requestToken"]}, {"required": ["refreshToken"]}]


class ConnectCompany(BaseModel):
    """``PUT /companies/{companyId}``'s body: what the company handed over, exactly one of the
    two (a request, not an answer; kept here beside the answers it leads to)."""

    model_config = ConfigDict(strict=True, extra="forbid", json_schema_extra=_exactly_one_token)
    requestToken: str | SkipJsonSchema[None] = Field(
        default=None,
        min_length=1,
        max_length=MAX_COMPANY_TOKEN_LENGTH,
        description="the App Center's requestToken (or the Company Request Token tool's), valid "
        "24 hours: exchanged with the password grant",
        json_schema_extra=_no_default,
    )
    refreshToken: str | SkipJsonSchema[None] = Field(
        default=None,
        min_length=1,
        max_length=MAX_COMPANY_TOKEN_LENGTH,
        description="a refresh token Concur issued for the company: exchanged with the "
        "refresh grant (it rotates; the new one is stored)",
        json_schema_extra=_no_default,
    )

    @model_validator(mode="after")
    def _one(self) -> ConnectCompany:
        if (self.requestToken is None) == (self.refreshToken is None):
            raise ValueError("give requestToken or refreshToken (exactly one)")
        return self


# -- partners' outcome webhooks (docs/webhooks.md) -----------------------------------------------

WebhookEventType = Literal["message.failed", "message.expired", "message.delivered"]
MAX_WEBHOOK_URL_LENGTH = 2048


class SetWebhook(BaseModel):
    """``PUT /partners/{partner}/webhook``'s body (a request, kept beside its answers)."""

    model_config = ConfigDict(strict=True, extra="forbid")
    url: str = Field(
        min_length=1,
        max_length=MAX_WEBHOOK_URL_LENGTH,
        description="the partner's endpoint: https:// (http:// only to loopback, and only with "
        "NOTIFY_WEBHOOK_ALLOW_PRIVATE); its host must not resolve to a private, loopback, "
        "link-local or metadata address",
    )
    events: list[WebhookEventType] | SkipJsonSchema[None] = Field(
        default=None,
        description="the event types it takes; absent or empty: message.failed, message.expired",
        json_schema_extra=_no_default,
    )


class WebhookView(BaseModel):
    """A partner's webhook as operators see it: never its secret."""

    model_config = ConfigDict(strict=True, extra="forbid", title="Webhook")
    partner: PartnerName
    url: str
    events: list[WebhookEventType]
    created: Timestamp | None
    updated: Timestamp | None
    previous_secret_until: Timestamp | None = Field(
        description="after a rotation: until when the previous secret signs too"
    )
    breaker: str = Field(description="the endpoint's circuit breaker: closed, open, half_open")


class WebhookSecret(BaseModel):
    """``PUT`` and ``POST .../rotate``: the webhook and the secret that signs its events now."""

    model_config = _answer
    webhook: WebhookView
    secret: str = Field(
        pattern=r"^whsec_[A-Za-z0-9+/=]+$",
        description="the signing secret (whsec_ + base64): give it to the partner; it is shown "
        "only here",
    )


class WebhookTestQueued(BaseModel):
    """``POST .../test``: the test event's id (its ``webhook-id``); a worker sends it."""

    model_config = _answer
    eventId: str


class WebhookDeadLetter(BaseModel):
    """One webhook event that could not be sent (a webhook dead letter)."""

    model_config = ConfigDict(strict=True, extra="forbid", title="WebhookDeadLetter")
    id: str
    kind: Literal["webhook"]
    type: str
    message_id: str
    partner: str
    state: str
    attempts: int
    reason: str | None
    detail: str | None
    http_status: int | None
    created: Timestamp | None
    dead: Timestamp | None


class WebhookDeadLetterList(BaseModel):
    """``GET /webhooks/failed``: webhook dead letters, newest first."""

    model_config = _answer
    items: list[WebhookDeadLetter]
