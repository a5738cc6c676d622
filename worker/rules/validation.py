"""One place that turns untrusted input into a ``Message`` or a list of problems.

Used by the producer (before anything is queued), by the worker (the queue is not trusted and
settings may have changed) and by the HTTP gateway (which answers the problems as ``ErrorMessage``).

Problem codes (stable; README lists them):
``INVALID_JSON``, ``INVALID_USER_ID``, ``MISSING_FIELD``, ``INVALID_FIELD``, ``UNKNOWN_FIELD``,
``TEMPLATE_NOT_ALLOWED``, ``URL_NOT_ALLOWED``, ``INVALID_COMPANY`` (not a company UUID), and
``TOO_MANY_ERRORS`` (the last entry when more than ``MAX_PROBLEMS`` were found: it counts those
not listed). Whether a company may be sent to (granted to the partner, in the registry, not
disconnected) is decided at intake (``worker.rules.grants``), not here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from worker.rules.allowlist import AllowList
from worker.shapes.models import (
    DEFAULT_COMPANY,
    MAX_ID_LENGTH,
    Message,
    SendRequest,
    is_company_id,
    is_partner_name,
)

INVALID_COMPANY = "INVALID_COMPANY"

# At most this many problems are reported: a 64 KB body of thousands of unknown keys would
# otherwise get an answer ten times its size. The rest are counted in one last entry.
MAX_PROBLEMS = 20
TOO_MANY_ERRORS = "TOO_MANY_ERRORS"


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with a request: which field, a stable code, and a sentence."""

    field: str
    code: str
    message: str


class InvalidRequest(ValueError):
    """A request that must not be sent; ``problems`` says why, one entry per problem."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = capped(problems)
        super().__init__("; ".join(f"{p.field}: {p.message}" for p in self.problems))

    @property
    def reason(self) -> str:
        """The dead-letter reason code for the first (most important) problem."""
        code = self.problems[0].code
        return {
            "TEMPLATE_NOT_ALLOWED": "template_not_allowed",
            "URL_NOT_ALLOWED": "url_not_allowed",
        }.get(code, "invalid_request")


def capped(problems: list[Problem]) -> list[Problem]:
    """The first ``MAX_PROBLEMS`` problems, plus one entry counting the others if any."""
    if len(problems) <= MAX_PROBLEMS:
        return problems
    more = len(problems) - MAX_PROBLEMS
    return [
        *problems[:MAX_PROBLEMS],
        Problem(
            "body",
            TOO_MANY_ERRORS,
            f"{more} more problem{'s' if more != 1 else ''} not listed "
            f"(only the first {MAX_PROBLEMS} are reported)",
        ),
    ]


def _user_id_problems(user_id: Any) -> list[Problem]:
    if not isinstance(user_id, str) or not user_id:
        return [Problem("userId", "INVALID_USER_ID", "userId must be a non-empty string")]
    if len(user_id) > MAX_ID_LENGTH:
        return [Problem("userId", "INVALID_USER_ID", f"userId is longer than {MAX_ID_LENGTH}")]
    if not user_id.isprintable() or any(ch.isspace() for ch in user_id):
        return [Problem("userId", "INVALID_USER_ID", "userId has whitespace or control characters")]
    if not user_id.strip("."):
        # "." and ".." are dot-segments: in Concur's URL they would change the path
        # (/messages/../session is /session), so they name no user.
        return [Problem("userId", "INVALID_USER_ID", "userId must not consist of dots only")]
    return []


def _schema_problems(error: ValidationError) -> list[Problem]:
    problems = []
    for item in error.errors():
        field = ".".join(str(part) for part in item["loc"]) or "body"
        kind = item["type"]
        if kind == "missing":
            problems.append(Problem(field, "MISSING_FIELD", f"{field} is required"))
        elif kind == "extra_forbidden":
            problems.append(Problem(field, "UNKNOWN_FIELD", f"{field} is not part of the request"))
        elif kind == "string_pattern_mismatch":
            # The one pattern of the request's text fields (models.TEXT_ID_PATTERN).
            problems.append(
                Problem(
                    field,
                    "INVALID_FIELD",
                    f"{field} must not contain control characters (U+0000-U+001F, U+007F-U+009F)",
                )
            )
        else:
            problems.append(Problem(field, "INVALID_FIELD", f"{field}: {item['msg']}"))
    return problems


def company_problem(company: Any) -> Problem | None:
    """Why ``company`` names no company (None: it is ``default``, absent, or a company UUID)."""
    if company is None or company == DEFAULT_COMPANY or is_company_id(company):
        return None
    return Problem(
        "company",
        INVALID_COMPANY,
        "company must be a company UUID in lower case (like "
        f"0f3c2f6e-4a1b-4c2d-9e8f-7a6b5c4d3e2f), or {DEFAULT_COMPANY!r}",
    )


def validate(
    user_id: Any,
    body: Any,
    allowlist: AllowList,
    *,
    partner: str | None = None,
    company: str | None = None,
) -> Message:
    """Check a request against the seed's schema and the allow-list; raise ``InvalidRequest``.

    ``partner`` (``default`` when None) is who sent it, ``company`` (``default`` when None) the
    Concur company it is for: both are part of the message's id.
    """
    problems = _user_id_problems(user_id)
    if partner is not None and not is_partner_name(partner):
        problems.append(Problem("partner", "INVALID_FIELD", "partner is not a partner name"))
    refused_company = company_problem(company)
    if refused_company is not None:
        problems.append(refused_company)
    try:
        request = SendRequest.model_validate(body)
    except ValidationError as error:
        problems += _schema_problems(error)
        raise InvalidRequest(problems) from None
    if problems:
        raise InvalidRequest(problems)
    refusals = allowlist.check(request.templateId, request.context.url)
    if refusals:
        raise InvalidRequest([Problem(r.field, r.code.upper(), r.reason) for r in refusals])
    return Message.create(
        user_id, request.sessionId, request.templateId, request.context.url, partner, company
    )


def validate_wire(wire: Any, allowlist: AllowList) -> Message:
    """Validate the stored/queued form ``{"userId", "sessionId", "templateId", "context"}``
    (plus ``"partner"`` for a partner other than ``default``, ``"company"`` for a company other
    than ``default``)."""
    if not isinstance(wire, dict):
        raise InvalidRequest([Problem("body", "INVALID_FIELD", "the request must be an object")])
    # "company" names whose company the message is for (issue 21), never part of the v4 body.
    body = {
        key: value for key, value in wire.items() if key not in ("userId", "partner", "company")
    }
    partner = wire.get("partner")
    if partner is not None and not isinstance(partner, str):
        raise InvalidRequest([Problem("partner", "INVALID_FIELD", "partner must be a string")])
    company = wire.get("company")
    if company is not None and not isinstance(company, str):
        raise InvalidRequest([Problem("company", INVALID_COMPANY, "company must be a string")])
    return validate(wire.get("userId"), body, allowlist, partner=partner, company=company)
