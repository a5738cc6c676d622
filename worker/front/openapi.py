"""The HTTP service's OpenAPI 3.1 document (served at ``/openapi.json``), generated.

Every schema is generated from a pydantic model: the seed's request and ``ErrorMessage``
(``worker.shapes.models``) and every answer (``worker.shapes.contract``), which are the models the
service answers through. Parameter limits and patterns are the constants those modules define. What
is
written here is only the route table (``OPERATIONS``): per operation its method, path, summary,
security, parameters, request model and documented answers.
``tests/integration/test_openapi.py`` checks live answers against the document;
``tests/integration/test_api.py`` that it names every route the app serves.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import GenerateJsonSchema, JsonSchemaMode
from pydantic_core import core_schema

from worker.front.notifications import NAMESPACE, SUPPORTED_STATUSES
from worker.shapes import contract
from worker.shapes.models import (
    IDEMPOTENCY_KEY_PATTERN,
    MAX_ID_LENGTH,
    MESSAGE_ID_PATTERN,
    PARTNER_PATTERN,
    ErrorMessage,
    SendRequest,
    schema_pattern,
)

JSON = "application/json"
XML = "application/xml"
SCHEMA_REF = "#/components/schemas/{model}"
PARTNER_KEY = "partnerKey"
OPERATOR_KEY = "operatorKey"
NO_KEY = ""  # in an operation's security: the key may be left out

Schema = dict[str, Any]


@dataclass(frozen=True, slots=True)
class Answer:
    """One documented response: what it means, and its body (a model, a plain schema, or none)."""

    description: str
    body: type[BaseModel] | Schema | None = None
    media_types: tuple[str, ...] = (JSON,)
    headers: Mapping[str, Schema] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Operation:
    """One row of the route table."""

    method: str
    path: str
    operation_id: str
    summary: str
    answers: Mapping[int, Answer]
    security: tuple[str, ...] = ()  # any one of these keys; () for none
    params: tuple[Schema, ...] = ()
    request: type[BaseModel] | None = None


# -- parameters: every limit and pattern from the module that enforces it -------------------------


def _param(
    name: str, where: str, schema: Schema, *, required: bool = False, description: str = ""
) -> Schema:
    param: Schema = {"name": name, "in": where, "schema": schema}
    if required or where == "path":
        param["required"] = True
    if description:
        param["description"] = description
    return param


_ID = _param("id", "path", {"type": "string", "pattern": schema_pattern(MESSAGE_ID_PATTERN)})
_USER_ID = _param("userId", "path", {"type": "string", "minLength": 1, "maxLength": MAX_ID_LENGTH})


def _status(*, required: bool) -> Schema:
    return _param(
        "status",
        "query",
        {"type": "string", "enum": list(SUPPORTED_STATUSES)},
        required=required,
        description="Only `failed` is supported.",
    )


_FILTERS = (
    _param("template", "query", {"type": "string"}),
    _param("user", "query", {"type": "string"}),
    _param("reason", "query", {"type": "string"}),
    _param(
        "since",
        "query",
        {"type": "string"},
        description="ISO-8601 date or date-time (UTC when no offset); dead-lettered at or after",
    ),
    _param(
        "until",
        "query",
        {"type": "string"},
        description="ISO-8601 date or date-time (UTC when no offset); dead-lettered by then",
    ),
    _param("partner", "query", {"type": "string", "pattern": schema_pattern(PARTNER_PATTERN)}),
    _param(
        "company",
        "query",
        {"type": "string", "pattern": contract.COMPANY_NAME_PATTERN},
        description="The company's UUID in lower case, or `default` (the settings' company)",
    ),
    _param(
        "httpStatus",
        "query",
        {
            "type": "integer",
            "minimum": contract.LOWEST_HTTP_STATUS,
            "maximum": contract.HIGHEST_HTTP_STATUS,
        },
        description="The HTTP status of the last attempt's answer",
    ),
)
_PAGING = (
    _param(
        "limit",
        "query",
        {
            "type": "integer",
            "minimum": 1,
            "maximum": contract.MAX_PAGE_LIMIT,
            "default": contract.DEFAULT_PAGE_LIMIT,
        },
    ),
    _param(
        "cursor",
        "query",
        {
            "type": "string",
            "pattern": contract.CURSOR_PATTERN,
            "maxLength": contract.MAX_CURSOR_LENGTH,
        },
        description="Opaque: the previous page's `X-Next-Cursor` (or its `Link: rel=next`), "
        "unchanged. A keyset on (time, id): letters added or deleted while paging never make "
        "a row repeat or go missing. Absent: the first page.",
    ),
)
_REPLAY_OPTIONS = (
    _param(
        "dryRun",
        "query",
        {"type": "string", "enum": ["true", "false"]},
        description="true: answer what would be replayed, change nothing",
    ),
    _param(
        "rate",
        "query",
        {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": contract.MAX_REPLAY_RATE},
        description="Replays a second; the paced redrive runs after the answer",
    ),
)

# -- answers -------------------------------------------------------------------------------------


def _error(description: str, headers: Mapping[str, Schema] | None = None) -> Answer:
    return Answer(description, ErrorMessage, headers=headers or {})


_UNAUTHORIZED = {
    401: _error(
        "No key, or a key that is not valid",
        {"WWW-Authenticate": {"required": True, "schema": {"type": "string"}}},
    ),
    429: _error(
        "Too many wrong keys from this address (or from everyone) lately: no key is checked "
        "until Retry-After has passed",
        {"Retry-After": {"required": True, "schema": {"type": "integer"}}},
    ),
}
_FORBIDDEN = {403: _error("The key is valid but lacks the role this endpoint needs")}
_UNAVAILABLE = {503: _error("Redis or the broker is unavailable")}
_NOT_ACCEPTABLE = {406: _error("Accept allows neither JSON nor XML")}
_BAD_FILTER = {400: _error("Unsupported status or a bad parameter")}
_NO_LETTER = {404: _error("No such failed notification")}
_OPERATOR_ERRORS = {**_UNAUTHORIZED, **_FORBIDDEN, **_UNAVAILABLE}
_COMPANY_ID = _param(
    "companyId",
    "path",
    {"type": "string", "pattern": contract.COMPANY_NAME_PATTERN},
    description="The company's UUID in lower case; `default`: the company the settings define "
    "(read only)",
)
_BAD_COMPANY = {400: _error("companyId is not a company UUID (`default` is read only)")}
_NO_COMPANY = {404: _error("No such company")}
_COMPANY_HEADER = _param(
    contract.COMPANY_HEADER,
    "header",
    {"type": "string", "pattern": contract.COMPANY_NAME_PATTERN},
    description="The Concur company of the user: its UUID in lower case, one granted to the "
    "partner's key (NOTIFY_PARTNER_COMPANIES) and connected in the registry. Absent (or "
    "`default`): the company the settings define.",
)
_LOCATION = {
    "Location": {"description": "/messages/{id}", "required": True, "schema": {"type": "string"}}
}
_PARTNER = _param(
    "partner",
    "path",
    {"type": "string", "pattern": schema_pattern(PARTNER_PATTERN)},
    description="The partner's name (its NOTIFY_GATEWAY_KEYS name; `default` for unkeyed "
    "producers)",
)
_BAD_PARTNER = {400: _error("partner is not a partner name")}
_NO_WEBHOOK = {404: _error("The partner has no webhook")}
_WEBHOOK = "/partners/{partner}/webhook"


def _webhook_answers(status: int, answer: Answer) -> dict[int, Answer]:
    # The routes on a partner's existing webhook: its answer first, then what each of them
    # refuses (a bad partner name, no webhook, the operator key's errors), in one order.
    return {status: answer, **_BAD_PARTNER, **_NO_WEBHOOK, **_OPERATOR_ERRORS}


_IDEMPOTENCY_HEADER = _param(
    contract.IDEMPOTENCY_HEADER,
    "header",
    {"type": "string", "pattern": schema_pattern(IDEMPOTENCY_KEY_PATTERN)},
    description="The partner's key for this request (1-255 visible ASCII characters, per "
    "partner): the same key and request give the same id and queue nothing; another request "
    "under the key within NOTIFY_IDEMPOTENCY_WINDOW_SECONDS is a 409. Absent: the whole request "
    "(userId, sessionId, templateId, context.url, company) is the key.",
)
_EXPIRES_HEADER = _param(
    contract.EXPIRES_HEADER,
    "header",
    {"type": "string", "format": "date-time"},
    description="The message's deadline, an RFC 3339 date-time with a time zone "
    "(2026-12-01T10:00:00Z): past it, it is never posted and becomes a dead letter `expired`. "
    "Absent: the partner's default (NOTIFY_PARTNER_EXPIRY_SECONDS), or none.",
)

OPERATIONS: tuple[Operation, ...] = (
    Operation(
        "post",
        "/messages/{userId}/session",
        "sendMessage",
        "Queue a message to a Concur user (the v4 contract)",
        {
            202: Answer(
                "Queued (or already queued: duplicate is true)",
                contract.Queued,
                headers={
                    **_LOCATION,
                    contract.REPLAYED_HEADER: {
                        "description": "true: the Idempotency-Key's earlier message answers",
                        "schema": {"type": "string", "enum": ["true"]},
                    },
                },
            ),
            400: _error(
                "Invalid JSON, schema violation, not allowed, a Concur-Company-Id that is "
                "not a company UUID, a bad Idempotency-Key (INVALID_IDEMPOTENCY_KEY), or an "
                "Expires-At that is not a date-time with a time zone or has passed "
                "(INVALID_DEADLINE)"
            ),
            409: _error(
                "The Idempotency-Key was used for another request within its window "
                "(IDEMPOTENCY_KEY_REUSED); nothing is queued; Location names the first message",
                _LOCATION,
            ),
            408: _error("The body did not arrive within NOTIFY_SERVICE_BODY_TIMEOUT_SECONDS"),
            413: _error("Body over NOTIFY_SERVICE_MAX_BODY_BYTES"),
            415: _error("Content-Type is not application/json"),
            **_UNAUTHORIZED,
            403: _error(
                "An operator key without a partner key's role, or a company not granted to "
                "the key's partner (COMPANY_NOT_GRANTED); nothing is queued"
            ),
            422: _error(
                "The company is not in the registry (UNKNOWN_COMPANY) or is disconnected "
                "(COMPANY_DISCONNECTED); nothing is queued"
            ),
            **_UNAVAILABLE,
        },
        security=(PARTNER_KEY,),
        params=(_USER_ID, _COMPANY_HEADER, _IDEMPOTENCY_HEADER, _EXPIRES_HEADER),
        request=SendRequest,
    ),
    Operation(
        "post",
        "/messages/batch",
        "sendMessages",
        f"Queue up to {contract.MAX_BATCH_MESSAGES} messages at once, each validated on its own",
        {
            202: Answer(
                "Every message accepted (queued, or a duplicate): one result per message, in order",
                contract.BatchAnswer,
            ),
            207: Answer(
                "Some (or all) messages refused: each refused one's result lists its errors and "
                "nothing of it was queued; the accepted ones were queued",
                contract.BatchAnswer,
            ),
            400: _error(
                "Not JSON, not an array of 1..500 messages (INVALID_BATCH), a "
                "Concur-Company-Id that is not a company UUID, or an Expires-At that is not a "
                "date-time with a time zone (INVALID_DEADLINE); nothing is queued"
            ),
            408: _error("The body did not arrive within NOTIFY_SERVICE_BODY_TIMEOUT_SECONDS"),
            413: _error(
                "Body over NOTIFY_SERVICE_MAX_BATCH_BODY_BYTES (PAYLOAD_TOO_LARGE), or more than "
                f"{contract.MAX_BATCH_MESSAGES} messages (TOO_MANY_MESSAGES); nothing is queued"
            ),
            415: _error("Content-Type is not application/json"),
            **_UNAUTHORIZED,
            403: _error(
                "An operator key without a partner key's role, or a company not granted to "
                "the key's partner (COMPANY_NOT_GRANTED); nothing is queued"
            ),
            422: _error(
                "The company is not in the registry (UNKNOWN_COMPANY) or is disconnected "
                "(COMPANY_DISCONNECTED); nothing is queued"
            ),
            **_UNAVAILABLE,
        },
        security=(PARTNER_KEY,),
        params=(_COMPANY_HEADER, _EXPIRES_HEADER),
        request=contract.BatchRequest,
    ),
    Operation(
        "get",
        "/messages/{id}",
        "getMessage",
        "A message's status, attempts and correlation id",
        {
            200: Answer("The status", contract.MessageStatus),
            404: _error("Unknown, another partner's, or its status record expired"),
            **_UNAUTHORIZED,
            **_UNAVAILABLE,
        },
        security=(PARTNER_KEY, OPERATOR_KEY),
        params=(_ID,),
    ),
    Operation(
        "delete",
        "/messages/{id}",
        "cancelMessage",
        "Cancel a message not yet posted: it is never posted",
        {
            200: Answer("Cancelled (or cancelled before): its status", contract.MessageStatus),
            404: _error("Unknown, another partner's, or its status record expired"),
            409: _error(
                "An attempt is under way or over (delivering, delivered, failed): not cancelled"
            ),
            **_UNAUTHORIZED,
            **_UNAVAILABLE,
        },
        security=(PARTNER_KEY, OPERATOR_KEY),
        params=(_ID,),
    ),
    Operation(
        "get",
        "/notifications",
        "listNotifications",
        "Failed notifications, newest first (Get Notifications by Status)",
        {
            200: Answer(
                "One page; the next is in Link (rel=next)",
                contract.NotificationList,
                (JSON, XML),
                {
                    "Link": {"schema": {"type": "string"}},
                    "X-Next-Cursor": {
                        "schema": {"type": "string", "pattern": contract.CURSOR_PATTERN}
                    },
                },
            ),
            **_BAD_FILTER,
            **_NOT_ACCEPTABLE,
            **_OPERATOR_ERRORS,
        },
        security=(OPERATOR_KEY,),
        params=(_status(required=True), *_FILTERS, *_PAGING),
    ),
    Operation(
        "post",
        "/notifications/replay",
        "replayNotifications",
        "Replay every failed notification the filters select",
        {
            200: Answer("dryRun=true: what would be replayed", contract.ReplayPreview),
            202: Answer("Sent back through the pipeline (paced: being sent)", contract.Replayed),
            **_BAD_FILTER,
            **_OPERATOR_ERRORS,
        },
        security=(OPERATOR_KEY,),
        params=(_status(required=False), *_FILTERS, *_REPLAY_OPTIONS),
    ),
    Operation(
        "get",
        "/notifications/{id}",
        "getNotification",
        "One failed notification",
        {
            200: Answer("It", contract.Notification, (JSON, XML)),
            **_NO_LETTER,
            **_NOT_ACCEPTABLE,
            **_OPERATOR_ERRORS,
        },
        security=(OPERATOR_KEY,),
        params=(_ID,),
    ),
    Operation(
        "delete",
        "/notifications/{id}",
        "deleteNotification",
        "Delete one failed notification",
        {204: Answer("Deleted"), **_NO_LETTER, **_OPERATOR_ERRORS},
        security=(OPERATOR_KEY,),
        params=(_ID,),
    ),
    Operation(
        "post",
        "/notifications/{id}/replay",
        "replayNotification",
        "Send one failed notification back through the pipeline",
        {
            202: Answer("Queued again", contract.Queued, headers=_LOCATION),
            **_NO_LETTER,
            **_OPERATOR_ERRORS,
        },
        security=(OPERATOR_KEY,),
        params=(_ID,),
    ),
    Operation(
        "get",
        "/companies",
        "listCompanies",
        "Every company: the default one (from the settings) first, then the registry's",
        {200: Answer("The companies", contract.CompanyList), **_OPERATOR_ERRORS},
        security=(OPERATOR_KEY,),
    ),
    Operation(
        "get",
        "/companies/{companyId}",
        "getCompany",
        "One company: its state, geolocation, when it connected and last refreshed",
        {
            200: Answer("The company", contract.CompanyView),
            **_BAD_COMPANY,
            **_NO_COMPANY,
            **_OPERATOR_ERRORS,
        },
        security=(OPERATOR_KEY,),
        params=(_COMPANY_ID,),
    ),
    Operation(
        "put",
        "/companies/{companyId}",
        "connectCompany",
        "Connect (or reconnect) a company with its request token or a refresh token",
        {
            200: Answer("Connected: the company as stored", contract.CompanyView),
            400: _error(
                "Not JSON, not exactly one of requestToken and refreshToken, or companyId is "
                "not a company UUID"
            ),
            413: _error("Body over NOTIFY_SERVICE_MAX_BODY_BYTES"),
            415: _error("Content-Type is not application/json"),
            502: _error(
                "Concur refused the token (CONCUR_REFUSED) or could not be asked "
                "(CONCUR_UNAVAILABLE); nothing was stored"
            ),
            **_UNAUTHORIZED,
            **_FORBIDDEN,
            503: _error(
                "Redis is unavailable, or this deployment has no OAuth client to connect "
                "companies with (NOT_CONFIGURED: set NOTIFY_OAUTH_CLIENT_ID and _SECRET)"
            ),
        },
        security=(OPERATOR_KEY,),
        params=(_COMPANY_ID,),
        request=contract.ConnectCompany,
    ),
    Operation(
        "delete",
        "/companies/{companyId}",
        "disconnectCompany",
        "Disconnect a company: its refresh token is deleted, it stays listed",
        {
            200: Answer("Disconnected: the company as stored", contract.CompanyView),
            **_BAD_COMPANY,
            **_NO_COMPANY,
            **_OPERATOR_ERRORS,
        },
        security=(OPERATOR_KEY,),
        params=(_COMPANY_ID,),
    ),
    Operation(
        "get",
        _WEBHOOK,
        "getWebhook",
        "A partner's outcome webhook: its URL, event types, endpoint breaker (never its secret)",
        _webhook_answers(200, Answer("The webhook", contract.WebhookView)),
        security=(OPERATOR_KEY,),
        params=(_PARTNER,),
    ),
    Operation(
        "put",
        _WEBHOOK,
        "setWebhook",
        "Send a partner's outcome events to a URL; answers the signing secret (kept if it had one)",
        {
            200: Answer("The webhook and its signing secret", contract.WebhookSecret),
            400: _error(
                "Not JSON, an unknown event type, a refused URL, or partner is not a partner name"
            ),
            413: _error("Body over NOTIFY_SERVICE_MAX_BODY_BYTES"),
            415: _error("Content-Type is not application/json"),
            **_UNAUTHORIZED,
            **_FORBIDDEN,
            503: _error(
                "Redis is unavailable, or NOTIFY_TOKEN_ENCRYPTION_KEY is not set (NOT_CONFIGURED: "
                "secrets are stored sealed)"
            ),
        },
        security=(OPERATOR_KEY,),
        params=(_PARTNER,),
        request=contract.SetWebhook,
    ),
    Operation(
        "delete",
        _WEBHOOK,
        "removeWebhook",
        "Remove a partner's webhook (its events not yet sent become webhook dead letters)",
        _webhook_answers(204, Answer("Removed")),
        security=(OPERATOR_KEY,),
        params=(_PARTNER,),
    ),
    Operation(
        "post",
        _WEBHOOK + "/rotate",
        "rotateWebhookSecret",
        "A new signing secret; the old one signs too for NOTIFY_WEBHOOK_ROTATION_GRACE_SECONDS",
        _webhook_answers(
            200, Answer("The webhook and its new signing secret", contract.WebhookSecret)
        ),
        security=(OPERATOR_KEY,),
        params=(_PARTNER,),
    ),
    Operation(
        "post",
        _WEBHOOK + "/test",
        "testWebhook",
        "Queue a webhook.test event for the partner's endpoint (sent by a worker, signed)",
        _webhook_answers(202, Answer("Queued", contract.WebhookTestQueued)),
        security=(OPERATOR_KEY,),
        params=(_PARTNER,),
    ),
    Operation(
        "get",
        "/webhooks/failed",
        "listWebhookDeadLetters",
        "Webhook events that could not be sent (after the last attempt), newest first",
        {
            200: Answer("Webhook dead letters", contract.WebhookDeadLetterList),
            400: _error("A bad parameter"),
            **_OPERATOR_ERRORS,
        },
        security=(OPERATOR_KEY,),
        params=(
            _param(
                "partner",
                "query",
                {"type": "string", "pattern": schema_pattern(PARTNER_PATTERN)},
                description="only this partner's",
            ),
            _param(
                "limit",
                "query",
                {"type": "integer", "minimum": 1, "maximum": contract.MAX_PAGE_LIMIT},
                description="at most this many (default 50)",
            ),
        ),
    ),
    Operation(
        "get", "/healthz", "healthz", "The process is up", {200: Answer("Up", contract.Health)}
    ),
    Operation(
        "get",
        "/readyz",
        "readyz",
        "Redis answers",
        {200: Answer("Ready", contract.Ready), 503: _error("Redis does not answer")},
    ),
    Operation(
        "get",
        "/metrics",
        "metrics",
        "Operators' counts in the Prometheus text format (per partner with an operator key)",
        {
            200: Answer("Prometheus text exposition", {"type": "string"}, ("text/plain",)),
            **_UNAUTHORIZED,
            403: _error("A partner key: the per-partner series are the operators'"),
            503: _error("Redis does not answer"),
        },
        security=(OPERATOR_KEY, NO_KEY),
    ),
    Operation(
        "get",
        "/openapi.json",
        "openapi",
        "This document",
        {200: Answer("The OpenAPI document", {"type": "object"})},
    ),
)

# -- the document --------------------------------------------------------------------------------


# What GenerateJsonSchema passes to field_title_should_be_set (its own alias is private).
_SchemaOrField = (
    core_schema.CoreSchema
    | core_schema.ModelField
    | core_schema.DataclassField
    | core_schema.TypedDictField
    | core_schema.ComputedField
)


class _Untitled(GenerateJsonSchema):
    """pydantic's generator without the titles it derives from field names ("Sessionid")."""

    def field_title_should_be_set(self, schema: _SchemaOrField) -> bool:
        """Never: a property's name already says it, a derived title only adds noise."""
        return False


def component_name(model: type[BaseModel]) -> str:
    """The model's name under ``components/schemas``: its title when it has one (the seed's
    names), else its class name, as pydantic names the models it nests."""
    title = model.model_config.get("title")
    return title if isinstance(title, str) else model.__name__


def _models(
    operations: Iterable[Operation],
) -> Iterator[tuple[type[BaseModel], JsonSchemaMode]]:
    for operation in operations:
        if operation.request is not None:
            yield operation.request, "validation"
        for answer in operation.answers.values():
            if isinstance(answer.body, type):
                yield answer.body, "serialization"


def _add(schemas: dict[str, Schema], name: str, schema: Schema) -> None:
    # Two different models of one name would silently describe one of them twice.
    if schemas.setdefault(name, schema) != schema:
        raise ValueError(f"two different schemas named {name!r}")


def _xml_hints(schemas: dict[str, Schema]) -> None:
    # How worker.front.notifications writes the failed list as XML: Concur's namespace, a wrapping
    # NotificationList, and <Errors> holding <Error> elements. Presentation only, so it is said
    # here next to the namespace rather than in the models.
    schemas["Notification"]["xml"] = {"name": "Notification", "namespace": NAMESPACE}
    schemas["NotificationList"]["xml"] = {
        "name": "NotificationList",
        "namespace": NAMESPACE,
        "wrapped": True,
    }
    schemas["Failure"]["properties"]["Errors"]["xml"] = {"wrapped": True}
    schemas["FailureError"]["xml"] = {"name": "Error"}


def component_schemas(operations: Iterable[Operation] = OPERATIONS) -> dict[str, Schema]:
    """The JSON Schema of every model the operations name, and of the models those nest."""
    schemas: dict[str, Schema] = {}
    for model, mode in _models(operations):
        schema = model.model_json_schema(
            ref_template=SCHEMA_REF, schema_generator=_Untitled, mode=mode
        )
        for name, nested in schema.pop("$defs", {}).items():
            _add(schemas, name, nested)
        _add(schemas, component_name(model), schema)
    return schemas


def _response(answer: Answer) -> Schema:
    response: Schema = {"description": answer.description}
    if answer.headers:
        response["headers"] = dict(answer.headers)
    if answer.body is not None:
        schema = (
            {"$ref": SCHEMA_REF.format(model=component_name(answer.body))}
            if isinstance(answer.body, type)
            else answer.body
        )
        response["content"] = {media: {"schema": schema} for media in answer.media_types}
    return response


def _operation(operation: Operation) -> Schema:
    entry: Schema = {
        "operationId": operation.operation_id,
        "summary": operation.summary,
        # NO_KEY: the key is optional (OpenAPI's empty requirement).
        "security": [{name: []} if name != NO_KEY else {} for name in operation.security],
    }
    if operation.params:
        entry["parameters"] = list(operation.params)
    if operation.request is not None:
        ref = SCHEMA_REF.format(model=component_name(operation.request))
        entry["requestBody"] = {"required": True, "content": {JSON: {"schema": {"$ref": ref}}}}
    entry["responses"] = {
        str(status): _response(answer) for status, answer in operation.answers.items()
    }
    return entry


def paths(operations: Iterable[Operation] = OPERATIONS) -> dict[str, Schema]:
    """The ``paths`` object of the route table."""
    result: dict[str, Schema] = {}
    for operation in operations:
        result.setdefault(operation.path, {})[operation.method] = _operation(operation)
    return result


@functools.cache
def _document_parts() -> tuple[dict[str, Schema], dict[str, Schema]]:
    # Generated once per process: the models and the route table do not change at run time.
    schemas = component_schemas()
    _xml_hints(schemas)
    return schemas, paths()


def openapi_document(server_url: str) -> dict[str, Any]:
    """The OpenAPI 3.1 document, with ``server_url`` as its one server."""
    schemas, operations = copy.deepcopy(_document_parts())
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "partner-notify HTTP service",
            "version": "1.0.0",
            "description": "A Concur Notifications v4 gateway that queues instead of sending, and "
            "Concur's Get Notifications by Status over the dead-letter store.",
        },
        "servers": [{"url": server_url}],
        "components": {
            "securitySchemes": {
                PARTNER_KEY: {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "a key from NOTIFY_GATEWAY_KEYS",
                },
                OPERATOR_KEY: {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "a key from NOTIFY_OPERATOR_KEYS",
                },
            },
            "schemas": schemas,
        },
        "paths": operations,
    }
