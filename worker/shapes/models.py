"""The seed's shapes at the boundary (pydantic) and the message as the code passes it (dataclass).

``SendRequest`` is Concur's ``NotificationsPartnerRequestBody``; ``ErrorMessage`` is Concur's
error body. ``Message`` is one validated request plus its stable id. The limits and patterns of
ids, URLs and partner names are defined here once: validation, the gateway, the worker and the
OpenAPI document (``worker.front.openapi``) all take them from this module.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MAX_ID_LENGTH = 256
MAX_URL_LENGTH = 2048
# The one pattern of message and dead-letter ids (``message_id`` and the malformed-task ids):
# short URL-safe strings. Always applied with ``fullmatch`` (``is_message_id``): ``match`` with
# ``$`` would also accept a trailing newline, and such an id must never reach a Redis key name.
MESSAGE_ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")
# Partners (``NOTIFY_GATEWAY_KEYS=name:key,...``): a request's partner is part of its id and its
# idempotency key. Unkeyed producers (``notify send``, ``tasks.enqueue``), and every record written
# before partners had names, are ``default``; no gateway key can be (settings refuse the name).
DEFAULT_PARTNER = "default"
# The partner of a bare gateway key (no ``name:``): a partner like any other, kept apart from the
# unkeyed producers, so it neither reads their messages nor makes their requests "duplicates".
BARE_KEY_PARTNER = "gateway"
PARTNER_PATTERN = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")
# sessionId and templateId: any text but control characters (C0, DEL, C1). They are shown to
# operators (``notify status``, the console) and a control character there is a terminal
# command (ESC [2J clears the screen, ESC ] 8 hides a link), never part of an id. Written with
# \u escapes, which Python, pydantic's regex engine and ECMA-262 all read alike.
TEXT_ID_PATTERN = re.compile(r"[^\u0000-\u001f\u007f-\u009f]*")
# Companies (issue 21): a Concur company is named by its company UUID in canonical lower-case
# text, the only form accepted (it becomes part of Redis key names). The company the settings
# define (NOTIFY_API_TOKEN or the NOTIFY_OAUTH_* set) is ``default``: messages that name no
# company go to it; it is not a registry entry.
DEFAULT_COMPANY = "default"
# A W3C traceparent (version 00, lower-case hex) as tracing writes one into a task
# (worker.ops.tracing) and the worker accepts it (worker.queue.envelopes).
TRACEPARENT_PATTERN = re.compile(r"00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")
COMPANY_ID_PATTERN = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
# A registry company's states: connected (its refresh token works), needs_reconnect (Concur
# refused its refresh token: connect it again with a new request token), disconnected (an
# operator removed it; its refresh token is deleted).
CompanyState = Literal["connected", "needs_reconnect", "disconnected"]
# An explicit idempotency key (the gateway's ``Idempotency-Key``, ``tasks.enqueue(…,
# idempotency_key=)``): 1 to 255 visible ASCII characters, as Stripe and Svix take them. It never
# reaches a Redis key name as it is (``idempotency_digest``).
IDEMPOTENCY_KEY_PATTERN = re.compile(r"[\x21-\x7e]{1,255}")
COMPANY_STATES: tuple[CompanyState, ...] = ("connected", "needs_reconnect", "disconnected")


def schema_pattern(pattern: re.Pattern[str]) -> str:
    """``pattern`` as a JSON Schema ``pattern``: anchored at both ends.

    JSON Schema's patterns search (ECMA-262 ``test``), ours are applied with ``fullmatch``; in
    ECMA-262 ``$`` is the end of the string only, so the anchored form accepts exactly what
    ``fullmatch`` accepts, and the document cannot state a pattern of its own.
    """
    return f"^(?:{pattern.pattern})$"


_strict = ConfigDict(strict=True, extra="forbid")


class Context(BaseModel):
    """``context`` of the v4 body: the URL applied to the template (optional)."""

    model_config = _strict
    url: str | None = Field(None, max_length=MAX_URL_LENGTH)


class SendRequest(BaseModel):
    """The seed's ``NotificationsPartnerRequestBody``."""

    # The title names its schema in the OpenAPI document: the seed's name, not ours.
    model_config = ConfigDict(strict=True, extra="forbid", title="NotificationsPartnerRequestBody")
    sessionId: str = Field(
        min_length=1, max_length=MAX_ID_LENGTH, pattern=schema_pattern(TEXT_ID_PATTERN)
    )
    templateId: str = Field(
        min_length=1, max_length=MAX_ID_LENGTH, pattern=schema_pattern(TEXT_ID_PATTERN)
    )
    context: Context


class ErrorItem(BaseModel):
    """One problem: a fresh ``errorId`` (a UUID), a stable ``errorCode``, a sentence."""

    # The docstrings of these two are their descriptions in the OpenAPI document. The service
    # always fills all three fields, so its schema requires them; Concur's own answers, which
    # may leave some out, are read leniently by worker.concur.client, not through this model.
    model_config = _strict
    errorId: str
    errorCode: str
    errorMessage: str


class ErrorMessage(BaseModel):
    """The seed's error body, one entry per problem; every error answer has this shape."""

    model_config = _strict
    errors: list[ErrorItem] = Field(min_length=1)


def message_id(
    user_id: str,
    session_id: str,
    template_id: str,
    partner: str | None = None,
    company: str | None = None,
    url: str | None = None,
) -> str:
    """The stable, URL-safe id of a request: the same (partner, company, user, session,
    template, context.url) gives the same id.

    The id doubles as the implicit idempotency key, so a request sent twice is found, not
    queued twice; it covers the whole request, so a second message with another URL is another
    message (before, the URL was left out and such a message was answered ``duplicate``). A
    request without a URL keeps the id it always had. It is per partner: partner ``default``
    keeps the unkeyed hash every earlier id was made with, any other partner's hash is keyed
    with its name, so two partners sending the same request get unrelated ids and neither can
    make the other's request a "duplicate". It is per company the same way: the default
    company's ids are the ones every earlier message had, another company's id hashes its UUID
    too (the same user id in two companies is two people).
    """
    parts = [user_id, session_id, template_id]
    if company is not None and company != DEFAULT_COMPANY:
        parts.append(company)
    text = "\x1f".join(parts)
    if url is not None:
        # After a separator no id part can hold (none has control characters), so the URL is
        # told apart from a company, and a request without one hashes as it always did.
        text += "\x1e" + url
    return _id_of(text.encode("utf-8", "surrogatepass"), partner)


def _id_of(data: bytes, partner: str | None) -> str:
    if partner is None or partner == DEFAULT_PARTNER:
        digest = hashlib.blake2b(data, digest_size=15).digest()
    else:
        key = partner.encode("utf-8", "surrogatepass")[:64]  # blake2b keys are at most 64 bytes
        digest = hashlib.blake2b(data, digest_size=15, key=key).digest()
    return base64.b32encode(digest).decode("ascii").lower()


def is_idempotency_key(value: object) -> bool:
    """Whether ``value`` is a valid explicit idempotency key (1-255 visible ASCII characters)."""
    return isinstance(value, str) and IDEMPOTENCY_KEY_PATTERN.fullmatch(value) is not None


def idempotency_digest(key: str) -> str:
    """The part of an idempotency key's Redis key name that stands for the key (hex, 32)."""
    return hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()


def request_fingerprint(wire: Mapping[str, Any], expires_ms: int | None) -> str:
    """What "the same body" means for an explicit idempotency key: the whole request (user,
    v4 body, company) and the deadline the caller gave (not one a partner default made)."""
    text = json.dumps(
        {"request": dict(wire), "expiresAt": expires_ms},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=True,
    )
    return hashlib.blake2b(text.encode("ascii"), digest_size=16).hexdigest()


def keyed_message_id(partner: str | None, key: str, fingerprint: str) -> str:
    """The id of a request sent with an explicit idempotency key: the same key and body give
    the same id; another key (or body) another. Never an implicit id: the text hashed has a
    control character (\x1d) no request's parts can hold."""
    data = f"\x1dkey\x1d{key}\x1d{fingerprint}".encode("utf-8", "surrogatepass")
    return _id_of(data, partner)


def is_partner_name(value: object) -> bool:
    """Whether ``value`` is a valid partner name (lower-case letters, digits, ``_.-``)."""
    return isinstance(value, str) and PARTNER_PATTERN.fullmatch(value) is not None


def partner_of(request: Mapping[str, Any] | None) -> str:
    """The partner a stored or queued request belongs to (``default`` when it names none)."""
    value = request.get("partner") if request else None
    return value if isinstance(value, str) and is_partner_name(value) else DEFAULT_PARTNER


def is_company_id(value: object) -> bool:
    """Whether ``value`` is a company UUID in canonical lower-case text (the whole string)."""
    return isinstance(value, str) and COMPANY_ID_PATTERN.fullmatch(value) is not None


def company_of(request: Mapping[str, Any] | None) -> str:
    """The company a stored or queued request is for: its ``company`` field, else the default.

    The one reader of a message's company (intake checks the name; a record written before
    companies existed names none and is the default company's).
    """
    value = request.get("company") if request else None
    return value if isinstance(value, str) and is_company_id(value) else DEFAULT_COMPANY


def is_message_id(value: object) -> bool:
    """Whether ``value`` has the form of a message or dead-letter id (the whole string)."""
    return isinstance(value, str) and MESSAGE_ID_PATTERN.fullmatch(value) is not None


def request_body(session_id: Any, template_id: Any, url: Any = None) -> dict[str, Any]:
    """The seed's v4 body from its parts (``context`` is ``{}`` without a URL); not validated."""
    context: dict[str, Any] = {} if url is None else {"url": url}
    return {"sessionId": session_id, "templateId": template_id, "context": context}


@dataclass(frozen=True, slots=True)
class Message:
    """One validated send request."""

    id: str
    user_id: str
    session_id: str
    template_id: str
    url: str | None = None
    partner: str = DEFAULT_PARTNER
    company: str = DEFAULT_COMPANY  # a registry company's UUID, or the settings' company
    # The deadline (epoch ms; None: none): past it the message is never posted, and becomes a
    # dead letter ``expired``. Kept in the record, not in the request.
    expires_ms: int | None = None
    # The explicit idempotency key and the request's fingerprint under it (``keyed``).
    idempotency_key: str | None = None
    fingerprint: str | None = None
    # The W3C traceparent of the producer's span (tracing on): it travels in the task envelope,
    # never to Concur nor into the stored request.
    trace: str | None = field(default=None, compare=False)

    @classmethod
    def create(
        cls,
        user_id: str,
        session_id: str,
        template_id: str,
        url: str | None = None,
        partner: str | None = None,
        company: str | None = None,
    ) -> Message:
        """A message with its id derived from the whole request, partner and company (see
        ``message_id``)."""
        partner = partner or DEFAULT_PARTNER
        company = company or DEFAULT_COMPANY
        return cls(
            message_id(user_id, session_id, template_id, partner, company, url),
            user_id,
            session_id,
            template_id,
            url,
            partner,
            company,
        )

    def expiring(self, expires_ms: int | None) -> Message:
        """This message with a deadline (None: none); its id is unchanged."""
        return replace(self, expires_ms=expires_ms)

    def keyed(self, key: str, given_expires_ms: int | None = None) -> Message:
        """This message sent under the explicit idempotency ``key``: its id comes from the key
        and the request's fingerprint (``given_expires_ms``: the deadline the caller gave)."""
        fingerprint = request_fingerprint(self.to_wire(), given_expires_ms)
        return replace(
            self,
            id=keyed_message_id(self.partner, key, fingerprint),
            idempotency_key=key,
            fingerprint=fingerprint,
        )

    def body(self) -> dict[str, Any]:
        """Exactly the seed's request body."""
        return request_body(self.session_id, self.template_id, self.url)

    def to_wire(self) -> dict[str, Any]:
        """The request as stored in Redis and carried by a task (user id plus the v4 body).

        A partner other than ``default`` is recorded as ``"partner"``, a company other than
        ``default`` as ``"company"`` (neither is sent to Concur); the default partner's and
        company's form is the one every earlier record has.
        """
        wire = {"userId": self.user_id, **self.body()}
        if self.partner != DEFAULT_PARTNER:
            wire["partner"] = self.partner
        if self.company != DEFAULT_COMPANY:
            wire["company"] = self.company
        return wire


MAX_RAW_EXCERPT = 4096  # how much of an unreadable message a dead letter keeps


def malformed_id(raw: str) -> str:
    """The id of the dead letter of an unreadable message or task, from its raw content.

    Never from a field the message claims, so a malformed message cannot overwrite another
    message's record; stable, so a redelivered copy lands on the same dead letter.
    """
    digest = hashlib.blake2b(raw.encode("utf-8", "replace"), digest_size=12).hexdigest()
    return f"bad{digest}"
