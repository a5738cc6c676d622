"""The stored form of a message, and the values read from it: one codec for Redis and the history.

Pure (no I/O): the Redis store (``records``), the dead letters (``deadletters``) and the
PostgreSQL history (``history``) write and read through these functions, and nothing outside
``worker.store`` parses what is stored.

* A request is kept compactly in a record's fields ``u``, ``s``, ``t``, ``url`` (and
  ``partner``, ``company``) when it has the usual shape, else as JSON in ``req``
  (``request_fields``, ``request_of``); the Lua's ``request_json``
  (worker/store/lua/request.lua) rebuilds the same JSON inside Redis.
* An attempt is kept as one field ``a<k>`` after its time: ``|number|outcome|status|cause|ms|cid``
  (``AttemptRecord.compact``, ``attempt_entry``), correlation ids that are UUIDs as 23
  characters (``short_cid``, ``long_cid``).
* What readers get: ``StatusRecord`` (a message's record, from Redis or the history) and
  ``DeadLetter``, each with its request already parsed.

The attempt-shaped values (``Claim``, ``AttemptRecord``, ``Failure``, ``now_ms``) live here too:
delivery builds them without importing the Redis store.
"""

from __future__ import annotations

import base64
import json
import re
import time
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from worker.shapes.models import (
    DEFAULT_COMPANY,
    DEFAULT_PARTNER,
    company_of,
    is_company_id,
    is_partner_name,
    partner_of,
)
from worker.shapes.times import int_or_none

_OUTCOME_CODES = {"delivered": "d", "retry": "r", "dead": "x", "deferred": "w"}
_OUTCOMES = {code: name for name, code in _OUTCOME_CODES.items()}
_COMPACT_REQUEST = {"u": "userId", "s": "sessionId", "t": "templateId"}
_USUAL_REQUEST_KEYS = frozenset({*_COMPACT_REQUEST.values(), "context", "partner", "company"})
_ATTEMPT_FIELD = re.compile(r"a[0-9]+")
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def now_ms() -> int:
    """Wall-clock milliseconds, the unit of every time stored in Redis."""
    return int(time.time() * 1000)


# -- attempts ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Claim:
    """The answer of ``claim``: ``go`` (attempt number and stored request) or why not."""

    verdict: str  # go | expired | done | stale | busy
    attempt: int = 0
    request: dict[str, Any] | None = None
    state: str = ""
    # The message's deadline (epoch ms), when it has one; ``expired``: it has passed.
    expires_ms: int | None = None


@dataclass(frozen=True, slots=True)
class AttemptRecord:
    """One attempt, as the status API shows it."""

    number: int
    at_ms: int
    outcome: str
    status: int | None
    cause: str
    duration_ms: int
    correlation_id: str | None

    def to_json(self) -> str:
        """The stored form."""
        return json.dumps(
            {
                "n": self.number,
                "at": self.at_ms,
                "outcome": self.outcome,
                "status": self.status,
                "cause": self.cause,
                "ms": self.duration_ms,
                "cid": self.correlation_id,
            },
            separators=(",", ":"),
        )

    def compact(self) -> str:
        """The stored form after its time: ``|number|outcome|status|cause|ms|cid``.

        The outcome is one letter for the usual ones, the cause is left out when it is just
        ``http_<status>``; the correlation id comes last, so it may hold any character.
        """
        cause = "" if self.status and self.cause == f"http_{self.status}" else self.cause or ""
        return "|".join(
            (
                "",
                str(self.number),
                _OUTCOME_CODES.get(self.outcome, str(self.outcome).replace("|", "/")),
                "" if self.status is None else str(self.status),
                cause.replace("|", "/"),
                str(self.duration_ms),
                short_cid(self.correlation_id or ""),
            )
        )


@dataclass(frozen=True, slots=True)
class Failure:
    """Everything a dead letter records about why it failed."""

    reason: str
    detail: str
    status: int | None = None
    errors: list[dict[str, str | None]] | None = None
    correlation_id: str | None = None
    task_id: str = ""
    worker: str = ""


def claim_from(reply: Any) -> Claim:
    """The claim script's reply (worker/store/lua/claim.lua) as a ``Claim``."""
    if reply[0] not in ("go", "expired"):
        return Claim(str(reply[0]), state=str(reply[1]))
    try:
        request = json.loads(reply[2])
    except (TypeError, ValueError):
        request = None
    deadline = int_or_none(reply[3]) if len(reply) > 3 else None
    return Claim(
        str(reply[0]),
        int(reply[1]),
        request if isinstance(request, dict) else None,
        expires_ms=deadline,
    )


def attempt_entry(value: str, created_ms: int) -> dict[str, Any]:
    """One stored attempt (``AttemptRecord.compact`` after its time) as ``to_json`` shows it."""
    delta, number, outcome, status, cause, ms, cid = (value.split("|", 6) + [""] * 7)[:7]
    code = int(status) if status.lstrip("-").isdigit() else None
    return {
        "n": int(number) if number.lstrip("-").isdigit() else None,
        "at": created_ms + int(delta) if delta.lstrip("-").isdigit() else None,
        "outcome": _OUTCOMES.get(outcome, outcome),
        "status": code,
        "cause": cause or (f"http_{code}" if code is not None else ""),
        "ms": int(ms) if ms.lstrip("-").isdigit() else None,
        "cid": long_cid(cid) or None,
    }


def short_cid(cid: str) -> str:
    """A correlation id as stored: a UUID (36 characters as text) as ``~`` + 22 of base64url."""
    if _UUID.fullmatch(cid):
        return "~" + base64.urlsafe_b64encode(uuid.UUID(cid).bytes).decode("ascii").rstrip("=")
    return "~" + cid if cid.startswith("~") else cid


def long_cid(stored: str) -> str:
    """A stored correlation id as it came (``short_cid`` undone)."""
    if stored.startswith("~~"):
        return stored[1:]
    if stored.startswith("~") and len(stored) == 23:
        try:
            raw = base64.urlsafe_b64decode(stored[1:] + "==")
        except ValueError:
            return stored
        if len(raw) != 16:
            return stored
        # What str(uuid.UUID(bytes=raw)) gives, without building the UUID (the history writer
        # undoes one per attempt).
        h = raw.hex()
        return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
    return stored


# -- requests and records ------------------------------------------------------------------------


def request_fields(request: Mapping[str, Any]) -> list[str]:
    """A request as record field/value pairs: compact (``u``, ``s``, ``t``, ``url``, and
    ``company`` for a company other than the default) when it has the usual shape
    (``Message.to_wire``), else its JSON as ``req``. The partner is apart."""
    if not is_usual(request):
        return ["req", dumps(dict(request))]
    parts = [request.get(name) for name in _COMPACT_REQUEST.values()]
    fields = [item for pair in zip(_COMPACT_REQUEST, parts, strict=True) for item in pair]
    context = request["context"]
    if "url" in context:
        fields += ["url", context["url"]]
    company = request.get("company")
    if company is not None:
        fields += ["company", company]
    return [str(item) for item in fields]


def is_usual(request: Mapping[str, Any]) -> bool:
    """Whether ``request`` is kept compactly (``request_fields``), not as JSON."""
    context = request.get("context")
    partner = request.get("partner")
    company = request.get("company")
    return (
        request.keys() <= _USUAL_REQUEST_KEYS
        and all(isinstance(request.get(name), str) for name in _COMPACT_REQUEST.values())
        and isinstance(context, dict)
        and context.keys() <= {"url"}
        and isinstance(context.get("url", ""), str)
        and (partner is None or (is_partner_name(partner) and partner != DEFAULT_PARTNER))
        and (company is None or is_company_id(company))
    )


def request_of(record: Mapping[str, Any]) -> dict[str, Any]:
    """The request a stored record holds (see ``request_fields``)."""
    if "req" in record or "u" not in record:
        return loads_object(record.get("req"))
    request: dict[str, Any] = {
        name: record.get(field, "") for field, name in _COMPACT_REQUEST.items()
    }
    request["context"] = {"url": record["url"]} if "url" in record else {}
    partner = record.get("partner")
    if partner and partner != DEFAULT_PARTNER:
        request["partner"] = partner
    company = record.get("company")
    if company and company != DEFAULT_COMPANY:
        request["company"] = company
    return request


def expand_record(record: Mapping[str, Any], earlier: list[Any] | None = None) -> dict[str, Any]:
    """A stored record in the shape ``status`` answers (``earlier``: attempts kept in a list)."""
    out: dict[str, Any] = {
        name: value
        for name, value in record.items()
        # "dq": the dispatcher's mark until a worker claims it (worker/delivery/dispatcher.py).
        if name not in ("u", "s", "t", "url", "du", "dq") and not _ATTEMPT_FIELD.fullmatch(name)
    }
    request = request_of(record)
    out["req"] = record["req"] if "req" in record else dumps(request)
    out.setdefault("partner", partner_of(request))
    out.setdefault("company", company_of(request))
    out.setdefault("replays", "0")
    try:
        created = int(record.get("created") or 0)
    except ValueError:
        created = 0
    if "du" in record and "updated" not in record:
        out["updated"] = str(created + _int(record["du"]))
    attempts = list(earlier or [])
    k = 1
    while f"a{k}" in record:
        attempts.append(attempt_entry(str(record[f"a{k}"]), created))
        k += 1
    out["attempts"] = attempts
    if out.get("state") == "delivered" and attempts and isinstance(attempts[-1], dict):
        last = attempts[-1]
        out.setdefault("attempt", "" if last.get("n") is None else str(last["n"]))
        out.setdefault("status", "" if last.get("status") is None else str(last["status"]))
        out.setdefault("cid", last.get("cid") or "")
    return out


def attempts_list(entries: list[Any]) -> list[Any]:
    """The entries of a record's attempts list (records from before attempts were folded in)."""
    return [json.loads(entry) for entry in entries]


@dataclass(frozen=True, slots=True)
class StatusRecord:
    """One message's status record, from Redis or (``source`` ``history``) the history.

    ``fields`` is the record as ``MessageStore.status`` answers it, every value as stored text
    (``req`` the request as JSON, ``attempts`` a list of ``AttemptRecord.to_json`` objects); it
    is what ``notify status --json`` prints. ``request`` is that request, parsed once here.
    """

    fields: dict[str, Any]
    request: dict[str, Any]

    @classmethod
    def from_fields(cls, fields: Mapping[str, Any]) -> StatusRecord:
        """The typed record of ``fields`` (``MessageStore.status``'s shape)."""
        return cls(dict(fields), loads_object(fields.get("req")))

    @property
    def state(self) -> str:
        """queued, inflight, retrying, delivered or failed ('' when the record has none)."""
        return str(self.fields.get("state") or "")

    @property
    def partner(self) -> str:
        """The partner the message belongs to (``default`` for records from before partners)."""
        return partner_of(self.request)

    @property
    def company(self) -> str:
        """The company the message is for (``default``: the one the settings define)."""
        return company_of(self.request)

    @property
    def attempts(self) -> list[dict[str, Any]]:
        """The attempts, oldest first, as ``AttemptRecord.to_json`` objects."""
        return [entry for entry in self.fields.get("attempts", []) if isinstance(entry, dict)]

    def get(self, name: str, default: Any = None) -> Any:
        """One stored field (text), or ``default``."""
        return self.fields.get(name, default)

    def to_dict(self) -> dict[str, Any]:
        """The record as JSON-ready plain data (``fields``)."""
        return dict(self.fields)


# -- dead letters --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """One message that failed for good, with everything an operator needs to decide."""

    id: str
    user_id: str
    request: dict[str, Any]
    reason: str
    detail: str
    status: int | None
    errors: list[dict[str, Any]]
    attempts: int
    first_attempt_ms: int | None
    last_attempt_ms: int | None
    dead_ms: int
    created_ms: int | None
    correlation_id: str | None
    task_id: str | None
    worker: str | None
    replays: int
    partner: str = DEFAULT_PARTNER
    company: str = DEFAULT_COMPANY

    @property
    def template_id(self) -> str | None:
        """The request's template id, when the request had one."""
        value = self.request.get("templateId")
        return value if isinstance(value, str) else None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (snake_case keys) for the CLI."""
        return asdict(self)

    @classmethod
    def from_hash(cls, data: dict[str, str]) -> DeadLetter:
        """Read the stored hash (worker/store/lua/dead.lua writes it)."""
        request = _object_or_raw(data.get("req"))
        errors = _list_of_objects(data.get("errors"))
        user_id = request.get("userId")
        return cls(
            id=data["id"],
            user_id=user_id if isinstance(user_id, str) else "",
            request=request,
            reason=data.get("reason", ""),
            detail=data.get("detail", ""),
            status=int_or_none(data.get("status")),
            errors=errors,
            attempts=int_or_none(data.get("attempts")) or 0,
            first_attempt_ms=int_or_none(data.get("first")),
            last_attempt_ms=int_or_none(data.get("last")),
            dead_ms=int_or_none(data.get("dead")) or 0,
            created_ms=int_or_none(data.get("created")),
            correlation_id=data.get("cid") or None,
            task_id=data.get("task") or None,
            worker=data.get("worker") or None,
            replays=int_or_none(data.get("replays")) or 0,
            partner=partner_of(request),
            company=company_of(request),
        )


# -- JSON ----------------------------------------------------------------------------------------


def dumps(value: Any) -> str:
    """``value`` as stored JSON: compact, UTF-8 kept as it is."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def loads_object(raw: Any) -> dict[str, Any]:
    """Stored JSON that should be an object; ``{}`` when it is absent or not one."""
    try:
        value = json.loads(raw) if raw else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _object_or_raw(raw: str | None) -> dict[str, Any]:
    # A dead letter's request: one that is not an object is kept, as {"raw": ...}, for the
    # operator to see.
    try:
        value = json.loads(raw) if raw else {}
    except ValueError:
        return {"raw": raw}
    return value if isinstance(value, dict) else {"raw": value}


def _list_of_objects(raw: str | None) -> list[dict[str, Any]]:
    try:
        value = json.loads(raw) if raw else []
    except ValueError:
        return []
    return [item for item in value if isinstance(item, dict)] if isinstance(value, list) else []


def _int(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0
