"""Scripts: what the sandbox answers, parsed from JSON and picked per request (no I/O here).

A script matches one userId, one templateId or everything. Its ``responses`` are consumed one per
matching request; afterwards ``then`` (default ``{"status": 200}``) answers. ``rate`` replaces
``responses`` with random flapping. A planned response (:class:`Plan`) is ``{"status",
"retryAfter", "delayMs", "errors", "body", "contentType", "hang", "drop", "garbled"}``, all
optional except ``status``. A geolocation's script (:class:`GeoScript`) adds to every answer
there: ``answer``, one planned response given to every valid post (an outage: the user's and
template's scripts are not consulted, so not used up), and ``delayMs``, added to every answer's
latency (a slow data center); :func:`pick_at` composes the two. The parsers raise
``ValueError`` with a message fit for a 400 answer, so a bad script is refused when it is posted,
never when a request meets it.
"""

from __future__ import annotations

import math
import random
import re
from collections import deque
from dataclasses import dataclass
from typing import Any

__all__ = [
    "DEFAULT_KEY",
    "GeoScript",
    "Plan",
    "Rate",
    "Script",
    "ScriptKey",
    "is_number",
    "parse_geo_script",
    "parse_plan",
    "parse_rate",
    "parse_script",
    "pick",
    "pick_at",
]

ScriptKey = tuple[str, str]
"""``("userId", id)``, ``("templateId", id)`` or :data:`DEFAULT_KEY`."""

DEFAULT_KEY: ScriptKey = ("default", "")

_PLAN_KEYS = frozenset(
    {"status", "retryAfter", "delayMs", "errors", "body", "contentType", "hang", "drop", "garbled"}
)
_RATE_KEYS = frozenset({"errorRatio", "statuses", "hangRatio", "seed"})
_SCRIPT_KEYS = frozenset({"match", "responses", "then", "rate"})
_GEO_SCRIPT_KEYS = frozenset({"answer", "delayMs"})
# What an HTTP/1.1 server may not put in a header value (HTAB is allowed); uvicorn refuses these
# when the answer is written, so they are refused here, when the script is posted.
_NOT_IN_HEADERS = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


@dataclass(frozen=True, slots=True)
class Plan:
    """One planned answer. ``hang``, ``drop`` and ``garbled`` are faults, in that precedence."""

    status: int = 200
    retry_after: str | None = None
    delay_ms: float = 0.0
    errors: tuple[dict[str, Any], ...] | None = None
    body: str | None = None
    content_type: str | None = None
    hang: bool = False
    drop: bool = False
    garbled: bool = False


@dataclass(slots=True)
class Rate:
    """Random flapping: a share of hangs, a share of errors drawn from ``statuses``."""

    error_ratio: float
    hang_ratio: float
    statuses: tuple[int, ...]
    rng: random.Random


@dataclass(slots=True)
class Script:
    """A script's state: the planned answers not yet used, what follows them, or a rate."""

    pending: deque[Plan]
    then: Plan
    rate: Rate | None


@dataclass(frozen=True, slots=True)
class GeoScript:
    """What one geolocation does to every post it receives: an outage answer, a delay."""

    answer: Plan | None = None
    delay_ms: float = 0.0


_HANG = Plan(hang=True)


def is_number(value: Any) -> bool:
    """True for an int or float that is not a bool (JSON's true is not a number here)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def _header_safe(value: str, name: str) -> str:
    # Values go verbatim into the response head; a line break would let a script corrupt framing.
    try:
        value.encode("latin-1")
    except UnicodeEncodeError:
        raise ValueError(f"{name} must be latin-1 text") from None
    if "\r" in value or "\n" in value:
        raise ValueError(f"{name} must not contain line breaks")
    if _NOT_IN_HEADERS.search(value):
        raise ValueError(f"{name} must not contain control characters")
    return value


def _flag(raw: dict[str, Any], key: str, where: str) -> bool:
    value = raw.get(key, False)
    if not isinstance(value, bool):
        raise ValueError(f"{where}.{key} must be a boolean")
    return value


def parse_plan(raw: Any, where: str) -> Plan:
    """A planned answer from its JSON; ``where`` names it in error messages."""
    if not isinstance(raw, dict):
        raise ValueError(f"{where} must be an object")
    unknown = sorted(set(raw) - _PLAN_KEYS)
    if unknown:
        raise ValueError(f"{where} has unknown keys: {', '.join(unknown)}")
    status = raw.get("status", 200)
    if not isinstance(status, int) or isinstance(status, bool) or not 200 <= status <= 599:
        raise ValueError(f"{where}.status must be an integer 200-599")
    retry_after = raw.get("retryAfter")
    if retry_after is not None:
        if is_number(retry_after):
            retry_after = str(retry_after)
        if not isinstance(retry_after, str):
            raise ValueError(f"{where}.retryAfter must be a string or number")
        _header_safe(retry_after, f"{where}.retryAfter")
    delay_ms = _delay_ms(raw, "delayMs", where)
    errors = raw.get("errors")
    if errors is not None and (
        not isinstance(errors, list) or not all(isinstance(e, dict) for e in errors)
    ):
        raise ValueError(f"{where}.errors must be a list of objects")
    body = raw.get("body")
    if body is not None and not isinstance(body, str):
        raise ValueError(f"{where}.body must be a string")
    content_type = raw.get("contentType")
    if content_type is not None:
        if not isinstance(content_type, str):
            raise ValueError(f"{where}.contentType must be a string")
        _header_safe(content_type, f"{where}.contentType")
    return Plan(
        status=status,
        retry_after=retry_after,
        delay_ms=delay_ms,
        errors=None if errors is None else tuple(dict(e) for e in errors),
        body=body,
        content_type=content_type,
        hang=_flag(raw, "hang", where),
        drop=_flag(raw, "drop", where),
        garbled=_flag(raw, "garbled", where),
    )


def _ratio(raw: dict[str, Any], key: str) -> float:
    value = raw.get(key, 0.0)
    if not is_number(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"rate.{key} must be a number between 0 and 1")
    return float(value)


def parse_rate(raw: Any) -> Rate:
    """Random flapping from its JSON; a ``seed`` makes the sequence repeatable."""
    if not isinstance(raw, dict):
        raise ValueError("rate must be an object")
    unknown = sorted(set(raw) - _RATE_KEYS)
    if unknown:
        raise ValueError(f"rate has unknown keys: {', '.join(unknown)}")
    error_ratio = _ratio(raw, "errorRatio")
    hang_ratio = _ratio(raw, "hangRatio")
    if error_ratio + hang_ratio > 1.0:
        raise ValueError("rate.errorRatio + rate.hangRatio must not exceed 1")
    statuses = raw.get("statuses", [500, 503, 504])
    if (
        not isinstance(statuses, list)
        or not statuses
        or not all(
            isinstance(s, int) and not isinstance(s, bool) and 200 <= s <= 599 for s in statuses
        )
    ):
        raise ValueError("rate.statuses must be a non-empty list of integers 200-599")
    seed = raw.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise ValueError("rate.seed must be an integer")
    return Rate(error_ratio, hang_ratio, tuple(statuses), random.Random(seed))


def _delay_ms(raw: dict[str, Any], key: str, where: str) -> float:
    value = raw.get(key, 0)
    if not is_number(value) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{where}.{key} must be a non-negative number")
    return float(value)


def parse_geo_script(raw: Any) -> GeoScript:
    """A geolocation's script from its JSON ``{"answer": plan | null, "delayMs": n}``."""
    if not isinstance(raw, dict):
        raise ValueError("a geolocation's script must be an object")
    unknown = sorted(set(raw) - _GEO_SCRIPT_KEYS)
    if unknown:
        raise ValueError(f"a geolocation's script has unknown keys: {', '.join(unknown)}")
    answer = raw.get("answer")
    return GeoScript(
        answer=None if answer is None else parse_plan(answer, "answer"),
        delay_ms=_delay_ms(raw, "delayMs", "script"),
    )


def parse_script(raw: Any) -> tuple[ScriptKey, Script]:
    """A script from its JSON ``{"match", "responses" | "rate", "then"}``, with what it matches."""
    if not isinstance(raw, dict):
        raise ValueError("script must be an object")
    unknown = sorted(set(raw) - _SCRIPT_KEYS)
    if unknown:
        raise ValueError(f"script has unknown keys: {', '.join(unknown)}")
    match = raw.get("match", {})
    if not isinstance(match, dict):
        raise ValueError("match must be an object")
    if set(match) - {"userId", "templateId"} or len(match) > 1:
        raise ValueError("match takes at most one of userId or templateId")
    key = DEFAULT_KEY
    for kind in ("userId", "templateId"):
        if kind in match:
            if not isinstance(match[kind], str) or not match[kind]:
                raise ValueError(f"match.{kind} must be a non-empty string")
            key = (kind, match[kind])
    responses = raw.get("responses")
    rate = raw.get("rate")
    if responses is not None and rate is not None:
        raise ValueError("a script takes responses or rate, not both")
    if responses is None:
        responses = []
    if not isinstance(responses, list):
        raise ValueError("responses must be a list")
    pending = deque(parse_plan(r, f"responses[{i}]") for i, r in enumerate(responses))
    then = parse_plan(raw.get("then", {"status": 200}), "then")
    return key, Script(pending, then, None if rate is None else parse_rate(rate))


def pick(scripts: dict[ScriptKey, Script], user_id: str, template_id: str | None) -> Plan | None:
    """The plan for a valid request, using it up; None when no script matches (a plain 200).

    Precedence: the user's script, the template's, the default one.
    """
    script = scripts.get(("userId", user_id))
    if script is None and template_id is not None:
        script = scripts.get(("templateId", template_id))
    if script is None:
        script = scripts.get(DEFAULT_KEY)
    if script is None:
        return None
    if script.pending:
        return script.pending.popleft()
    rate = script.rate
    if rate is not None:
        roll = rate.rng.random()
        if roll < rate.hang_ratio:
            return _HANG
        if roll < rate.hang_ratio + rate.error_ratio:
            return Plan(status=rate.rng.choice(rate.statuses))
    return script.then


def pick_at(
    scripts: dict[ScriptKey, Script],
    geo: GeoScript | None,
    user_id: str,
    template_id: str | None,
) -> Plan | None:
    """The plan for a valid request at a geolocation: its outage answer when it has one (the
    other scripts are left as they are), else :func:`pick`'s. Its delay is the caller's to add.
    """
    if geo is not None and geo.answer is not None:
        return geo.answer
    return pick(scripts, user_id, template_id)
