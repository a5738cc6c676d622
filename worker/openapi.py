"""The HTTP service's OpenAPI 3.1 document, written by hand (served at ``/openapi.json``).

The gateway's request body and ``ErrorMessage`` are the seed's schemas; ``NotificationList`` and
``Notification`` follow Concur's "Get Notifications by Status". ``tests/test_api.py`` validates
this document and checks that it names every route the app serves.
"""

from __future__ import annotations

from typing import Any

_REF = "#/components/schemas/"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": _REF + name}


def _error(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": _ref("ErrorMessage")}},
    }


_ERRORS = {
    "401": _error("No key, or a key that is not valid"),
    "403": _error("The key is valid but lacks the role this endpoint needs"),
    "503": _error("Redis or the broker is unavailable"),
}
_ID: dict[str, Any] = {
    "name": "id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"},
}
_FILTERS: list[dict[str, Any]] = [
    {
        "name": "status",
        "in": "query",
        "required": True,
        "description": "Only `failed` is supported.",
        "schema": {"type": "string", "enum": ["failed"]},
    },
    {"name": "template", "in": "query", "schema": {"type": "string"}},
    {"name": "user", "in": "query", "schema": {"type": "string"}},
    {"name": "reason", "in": "query", "schema": {"type": "string"}},
    {
        "name": "since",
        "in": "query",
        "description": "ISO-8601 date or date-time (UTC when no offset); dead-lettered at or after",
        "schema": {"type": "string"},
    },
    {
        "name": "until",
        "in": "query",
        "description": "ISO-8601 date or date-time (UTC when no offset); dead-lettered by then",
        "schema": {"type": "string"},
    },
    {"name": "partner", "in": "query", "schema": {"type": "string"}},
    {
        "name": "httpStatus",
        "in": "query",
        "description": "The HTTP status of the last attempt's answer",
        "schema": {"type": "integer", "minimum": 100, "maximum": 599},
    },
]
_PAGING = [
    {
        "name": "limit",
        "in": "query",
        "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 50},
    },
    {
        "name": "cursor",
        "in": "query",
        "description": "From the previous page's `X-Next-Cursor` (or its `Link: rel=next`)",
        "schema": {"type": "integer", "minimum": 0, "default": 0},
    },
]
_NOTIFICATION_CONTENT = {
    "application/json": {"schema": _ref("Notification")},
    "application/xml": {"schema": _ref("Notification")},
}
_OPERATOR: list[dict[str, list[str]]] = [{"operatorKey": []}]
_PARTNER: list[dict[str, list[str]]] = [{"partnerKey": []}]
_NULLABLE_STRING = {"type": ["string", "null"]}
_TIME = {"type": ["string", "null"], "format": "date-time"}

_SCHEMAS: dict[str, Any] = {
    "NotificationsPartnerRequestBody": {
        "type": "object",
        "required": ["sessionId", "templateId", "context"],
        "additionalProperties": False,
        "properties": {
            "sessionId": {"type": "string", "minLength": 1, "maxLength": 256},
            "templateId": {"type": "string", "minLength": 1, "maxLength": 256},
            "context": {
                "type": "object",
                "additionalProperties": False,
                "properties": {"url": {"type": ["string", "null"], "maxLength": 2048}},
            },
        },
    },
    "ErrorMessage": {
        "type": "object",
        "properties": {
            "errors": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "errorId": {"type": "string"},
                        "errorCode": {"type": "string"},
                        "errorMessage": {"type": "string"},
                    },
                },
            }
        },
    },
    "Queued": {
        "type": "object",
        "required": ["id", "status", "duplicate"],
        "properties": {
            "id": {"type": "string"},
            "status": {"type": "string", "enum": ["queued", "retrying", "delivered", "failed"]},
            "duplicate": {
                "type": "boolean",
                "description": "true: the same (userId, sessionId, templateId) was submitted "
                "before; nothing new was queued and id is the first message's",
            },
        },
    },
    "Attempt": {
        "type": "object",
        "properties": {
            "number": {"type": ["integer", "null"]},
            "at": _TIME,
            "outcome": {"type": ["string", "null"]},
            "httpStatus": {"type": ["integer", "null"]},
            "cause": _NULLABLE_STRING,
            "durationMs": {"type": ["integer", "null"]},
            "correlationId": _NULLABLE_STRING,
        },
    },
    "MessageStatus": {
        "type": "object",
        "required": ["id", "status", "state", "attempts"],
        "properties": {
            "id": {"type": "string"},
            "status": {"type": "string", "enum": ["queued", "retrying", "delivered", "failed"]},
            "state": {
                "type": "string",
                "description": "the internal state; `inflight` (an attempt in progress) shows as "
                "status `queued`",
            },
            "userId": _NULLABLE_STRING,
            "sessionId": _NULLABLE_STRING,
            "templateId": _NULLABLE_STRING,
            "context": {"type": "object"},
            "attempts": {"type": "array", "items": _ref("Attempt")},
            "correlationId": _NULLABLE_STRING,
            "lastHttpStatus": {"type": ["integer", "null"]},
            "createdAt": _TIME,
            "updatedAt": _TIME,
            "nextAttemptAt": _TIME,
            "replays": {"type": "integer"},
            "reason": _NULLABLE_STRING,
            "notificationUri": _NULLABLE_STRING,
        },
    },
    "Failure": {
        "type": "object",
        "properties": {
            "ReasonCode": {"type": "string"},
            "Detail": _NULLABLE_STRING,
            "HttpStatus": {"type": ["integer", "null"]},
            "Errors": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {
                        "ErrorId": _NULLABLE_STRING,
                        "ErrorCode": _NULLABLE_STRING,
                        "ErrorMessage": _NULLABLE_STRING,
                    },
                },
                "xml": {"wrapped": True},
            },
            "Attempts": {"type": "integer"},
            "FirstAttemptDateTime": _TIME,
            "LastAttemptDateTime": _TIME,
            "CorrelationId": _NULLABLE_STRING,
            "UserId": _NULLABLE_STRING,
            "SessionId": _NULLABLE_STRING,
            "TemplateId": _NULLABLE_STRING,
            "Replays": {"type": "integer"},
        },
    },
    "Notification": {
        "type": "object",
        "description": "Concur's Notification element; a null is written in XML as i:nil",
        "properties": {
            "Context": _NULLABLE_STRING,
            "EventDateTime": {"type": ["string", "null"], "examples": ["2012-11-14T19:45:25Z"]},
            "EventType": {"type": "string"},
            "NotificationURI": {"type": "string", "format": "uri"},
            "ObjectType": {"type": "string", "enum": ["NOTIFICATION"]},
            "ObjectURI": {"type": "string", "format": "uri"},
            "Failure": _ref("Failure"),
        },
        "xml": {"namespace": "http://www.concursolutions.com/api/notification/2012/06"},
    },
    "NotificationList": {
        "type": "array",
        "items": _ref("Notification"),
        "xml": {
            "name": "NotificationList",
            "namespace": "http://www.concursolutions.com/api/notification/2012/06",
            "wrapped": True,
        },
    },
    "Replayed": {
        "type": "object",
        "properties": {"count": {"type": "integer"}, "ids": {"type": "array"}},
    },
}


def openapi_document(server_url: str) -> dict[str, Any]:
    """The OpenAPI 3.1 document, with ``server_url`` as its one server."""
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
                "partnerKey": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "a key from NOTIFY_GATEWAY_KEYS",
                },
                "operatorKey": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "a key from NOTIFY_OPERATOR_KEYS",
                },
            },
            "schemas": _SCHEMAS,
        },
        "paths": {
            "/messages/{userId}/session": {
                "post": {
                    "operationId": "sendMessage",
                    "summary": "Queue a message to a Concur user (the v4 contract)",
                    "security": _PARTNER,
                    "parameters": [
                        {
                            "name": "userId",
                            "in": "path",
                            "required": True,
                            "schema": {"type": "string", "minLength": 1, "maxLength": 256},
                        }
                    ],
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {"schema": _ref("NotificationsPartnerRequestBody")}
                        },
                    },
                    "responses": {
                        "202": {
                            "description": "Queued (or already queued: duplicate is true)",
                            "headers": {
                                "Location": {
                                    "description": "/messages/{id}",
                                    "schema": {"type": "string"},
                                }
                            },
                            "content": {"application/json": {"schema": _ref("Queued")}},
                        },
                        "400": _error("Invalid JSON, schema violation, or not allowed"),
                        "413": _error("Body over NOTIFY_SERVICE_MAX_BODY_BYTES"),
                        "415": _error("Content-Type is not application/json"),
                        **_ERRORS,
                    },
                }
            },
            "/messages/{id}": {
                "get": {
                    "operationId": "getMessage",
                    "summary": "A message's status, attempts and correlation id",
                    "security": [*_PARTNER, *_OPERATOR],
                    "parameters": [_ID],
                    "responses": {
                        "200": {
                            "description": "The status",
                            "content": {"application/json": {"schema": _ref("MessageStatus")}},
                        },
                        "404": _error("Unknown, or its status record expired"),
                        **_ERRORS,
                    },
                }
            },
            "/notifications": {
                "get": {
                    "operationId": "listNotifications",
                    "summary": "Failed notifications, newest first (Get Notifications by Status)",
                    "security": _OPERATOR,
                    "parameters": [*_FILTERS, *_PAGING],
                    "responses": {
                        "200": {
                            "description": "One page; the next is in Link (rel=next)",
                            "headers": {
                                "Link": {"schema": {"type": "string"}},
                                "X-Next-Cursor": {"schema": {"type": "integer"}},
                            },
                            "content": {
                                "application/json": {"schema": _ref("NotificationList")},
                                "application/xml": {"schema": _ref("NotificationList")},
                            },
                        },
                        "400": _error("Unsupported status or a bad parameter"),
                        "406": _error("Accept is neither JSON nor XML"),
                        **_ERRORS,
                    },
                }
            },
            "/notifications/replay": {
                "post": {
                    "operationId": "replayNotifications",
                    "summary": "Replay every failed notification the filters select",
                    "security": _OPERATOR,
                    "parameters": [
                        {**_FILTERS[0], "required": False},
                        *_FILTERS[1:],
                        {
                            "name": "dryRun",
                            "in": "query",
                            "description": "true: answer what would be replayed, change nothing",
                            "schema": {"type": "string", "enum": ["true", "false"]},
                        },
                        {
                            "name": "rate",
                            "in": "query",
                            "description": "Replays a second; the paced redrive runs after the "
                            "answer",
                            "schema": {"type": "number", "exclusiveMinimum": 0},
                        },
                    ],
                    "responses": {
                        "200": {
                            "description": "dryRun=true: what would be replayed",
                            "content": {"application/json": {"schema": _ref("Replayed")}},
                        },
                        "202": {
                            "description": "Sent back through the pipeline (paced: being sent)",
                            "content": {"application/json": {"schema": _ref("Replayed")}},
                        },
                        "400": _error("Unsupported status or a bad parameter"),
                        **_ERRORS,
                    },
                }
            },
            "/notifications/{id}": {
                "get": {
                    "operationId": "getNotification",
                    "summary": "One failed notification",
                    "security": _OPERATOR,
                    "parameters": [_ID],
                    "responses": {
                        "200": {"description": "It", "content": _NOTIFICATION_CONTENT},
                        "404": _error("No such failed notification"),
                        "406": _error("Accept is neither JSON nor XML"),
                        **_ERRORS,
                    },
                },
                "delete": {
                    "operationId": "deleteNotification",
                    "summary": "Delete one failed notification",
                    "security": _OPERATOR,
                    "parameters": [_ID],
                    "responses": {
                        "204": {"description": "Deleted"},
                        "404": _error("No such failed notification"),
                        **_ERRORS,
                    },
                },
            },
            "/notifications/{id}/replay": {
                "post": {
                    "operationId": "replayNotification",
                    "summary": "Send one failed notification back through the pipeline",
                    "security": _OPERATOR,
                    "parameters": [_ID],
                    "responses": {
                        "202": {
                            "description": "Queued again",
                            "content": {"application/json": {"schema": _ref("Queued")}},
                        },
                        "404": _error("No such failed notification"),
                        **_ERRORS,
                    },
                }
            },
            "/healthz": {
                "get": {
                    "operationId": "healthz",
                    "summary": "The process is up",
                    "security": [],
                    "responses": {"200": {"description": "Up"}},
                }
            },
            "/readyz": {
                "get": {
                    "operationId": "readyz",
                    "summary": "Redis answers",
                    "security": [],
                    "responses": {
                        "200": {"description": "Ready"},
                        "503": _error("Redis does not answer"),
                    },
                }
            },
            "/metrics": {
                "get": {
                    "operationId": "metrics",
                    "summary": "Operators' counts in the Prometheus text format",
                    "security": [],
                    "responses": {
                        "200": {
                            "description": "Prometheus text exposition",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        },
                        "503": _error("Redis does not answer"),
                    },
                }
            },
            "/openapi.json": {
                "get": {
                    "operationId": "openapi",
                    "summary": "This document",
                    "security": [],
                    "responses": {"200": {"description": "The OpenAPI document"}},
                }
            },
        },
    }
