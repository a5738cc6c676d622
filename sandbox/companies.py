"""Concur companies as the sandbox plays them: who they are, where they live, their tokens.

A company is named by its Concur company UUID (canonical lowercase text), lives at one of the
sandbox's geolocations and holds a request token (what the App Center hands the partner, for the
password grant with ``username=<companyId>``, ``password=<requestToken>``,
``credtype=authtoken``). The token endpoint (``sandbox.oauth``) issues each company access and
refresh tokens of its own; :class:`Companies` indexes them by token, so checking a post's token
is one dict lookup however many companies there are.

The default company (the token endpoint's ``companyId``/``authToken`` and the configured static
tokens) is not one of these: it is named :data:`DEFAULT_COMPANY` in filters and summaries, and
records carry ``null`` for it.

Not thread-safe: the sandbox calls it under its own lock.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Container, Iterable
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "DEFAULT_COMPANY",
    "GEOLOCATION_NAME",
    "Companies",
    "Company",
    "CompanySpec",
    "parse_companies",
    "parse_geolocation_name",
]

DEFAULT_COMPANY = "default"
GEOLOCATION_NAME = re.compile(r"[a-z][a-z0-9-]{0,31}")
_COMPANY_KEYS = frozenset({"id", "geolocation", "requestToken", "refreshToken", "clientId"})
_UPDATE_KEYS = frozenset(
    {"geolocation", "requestToken", "revokeRefreshTokens", "revokeAccessTokens"}
)


def parse_geolocation_name(name: Any) -> str:
    """A geolocation's name (``us``, ``emea``, ``us-impl``: lowercase letters, digits, ``-``)."""
    if not isinstance(name, str) or not GEOLOCATION_NAME.fullmatch(name):
        raise ValueError(
            "a geolocation's name is 1-32 lowercase letters, digits or '-', "
            f"starting with a letter: {name!r}"
        )
    return name


def _company_id(value: Any, where: str) -> str:
    if isinstance(value, str):
        try:
            if str(uuid.UUID(value)) == value:
                return value
        except ValueError:
            pass
    raise ValueError(f"{where}.id must be a company UUID in canonical lowercase text")


def _text(raw: dict[str, Any], key: str, where: str, *, required: bool) -> str | None:
    value = raw.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value:
        raise ValueError(f"{where}.{key} must be a non-empty string")
    return value


def _geolocation(value: Any, where: str, geolocations: Container[str]) -> str:
    if not isinstance(value, str) or value not in geolocations:
        raise ValueError(
            f"{where}.geolocation must name one of the sandbox's geolocations "
            f"(add one with POST /_sandbox/geolocations): {value!r}"
        )
    return value


@dataclass(frozen=True, slots=True)
class CompanySpec:
    """A company to create (``refresh_token``: one it holds already, bound to ``client_id``
    when given, else to the first client that presents it)."""

    id: str
    geolocation: str
    request_token: str = field(repr=False)
    refresh_token: str | None = field(default=None, repr=False)
    client_id: str | None = None


def _parse_company(raw: Any, where: str, geolocations: Container[str]) -> CompanySpec:
    if not isinstance(raw, dict):
        raise ValueError(f"{where} must be an object")
    unknown = sorted(set(raw) - _COMPANY_KEYS)
    if unknown:
        raise ValueError(f"{where} has unknown keys: {', '.join(unknown)}")
    request_token = _text(raw, "requestToken", where, required=True)
    assert request_token is not None
    return CompanySpec(
        id=_company_id(raw.get("id"), where),
        geolocation=_geolocation(raw.get("geolocation"), where, geolocations),
        request_token=request_token,
        refresh_token=_text(raw, "refreshToken", where, required=False),
        client_id=_text(raw, "clientId", where, required=False),
    )


def parse_companies(raw: Any, geolocations: Container[str]) -> list[CompanySpec]:
    """Companies from a ``POST /_sandbox/companies`` document: one company, or
    ``{"companies": [...]}``; all are refused when one is invalid or an id repeats."""
    if isinstance(raw, dict) and set(raw) == {"companies"}:
        items = raw["companies"]
        if not isinstance(items, list):
            raise ValueError("companies must be a list")
        specs = [_parse_company(r, f"companies[{i}]", geolocations) for i, r in enumerate(items)]
    else:
        specs = [_parse_company(raw, "company", geolocations)]
    seen: set[str] = set()
    for spec in specs:
        if spec.id in seen:
            raise ValueError(f"company {spec.id} is listed twice")
        seen.add(spec.id)
    return specs


@dataclass(slots=True, eq=False)
class Company:
    """One company's state (its tokens never in the repr)."""

    id: str
    geolocation: str
    request_token: str = field(repr=False)
    created_at: float
    access: dict[str, float] = field(default_factory=dict, repr=False)  # token -> expires
    refresh: set[str] = field(default_factory=set, repr=False)
    token_requests: int = 0
    grants: dict[str, int] = field(default_factory=dict)
    codes: dict[int, int] = field(default_factory=dict)

    def summary(self, now: float) -> dict[str, Any]:
        """What ``GET /_sandbox/companies/{id}`` shows (no secret in it)."""
        return {
            "id": self.id,
            "geolocation": self.geolocation,
            "createdAt": self.created_at,
            "tokenRequests": self.token_requests,
            "grants": dict(self.grants),
            "codes": {str(k): v for k, v in sorted(self.codes.items())},
            "liveAccessTokens": sum(1 for t in self.access.values() if t > now),
            "liveRefreshTokens": len(self.refresh),
        }


class Companies:
    """Every company and every token issued to one, indexed by id and by token."""

    def __init__(self) -> None:
        self._by_id: dict[str, Company] = {}
        self._access: dict[str, tuple[Company, float]] = {}  # token -> (company, expires)
        # token -> (company, client id it is bound to or None for the first to present it,
        # expires)
        self._refresh: dict[str, tuple[Company, str | None, float]] = {}
        self._retired: dict[str, Company] = {}  # refresh tokens spent or revoked

    def __len__(self) -> int:
        return len(self._by_id)

    def all(self) -> list[Company]:
        """Every company, oldest first."""
        return list(self._by_id.values())

    def get(self, company_id: str) -> Company | None:
        """The company, or None."""
        return self._by_id.get(company_id)

    def create(self, specs: Iterable[CompanySpec], now: float, refresh_ttl_s: float) -> int:
        """Create (or replace, forgetting the old one's tokens) each company; how many."""
        count = 0
        for spec in specs:
            self.remove(spec.id)
            company = Company(spec.id, spec.geolocation, spec.request_token, now)
            self._by_id[spec.id] = company
            if spec.refresh_token is not None:
                self._add_refresh(company, spec.refresh_token, spec.client_id, now + refresh_ttl_s)
            count += 1
        return count

    def remove(self, company_id: str) -> bool:
        """Forget a company; its tokens stop working. False when there was none."""
        company = self._by_id.pop(company_id, None)
        if company is None:
            return False
        self.revoke_access(company)
        for token in company.refresh:
            self._refresh.pop(token, None)
        self._retired = {t: c for t, c in self._retired.items() if c is not company}
        return True

    def clear(self) -> int:
        """Forget every company; how many there were."""
        count = len(self._by_id)
        self._by_id.clear()
        self._access.clear()
        self._refresh.clear()
        self._retired.clear()
        return count

    def update(self, company: Company, doc: dict[str, Any], geolocations: Container[str]) -> None:
        """Apply a ``POST /_sandbox/companies/{id}`` document; nothing changes when invalid."""
        unknown = sorted(set(doc) - _UPDATE_KEYS)
        if unknown:
            raise ValueError(f"company has unknown keys: {', '.join(unknown)}")
        geolocation = (
            _geolocation(doc["geolocation"], "company", geolocations)
            if "geolocation" in doc
            else company.geolocation
        )
        request_token = _text(doc, "requestToken", "company", required=False)
        flags = {}
        for key in ("revokeRefreshTokens", "revokeAccessTokens"):
            flags[key] = doc.get(key, False)
            if not isinstance(flags[key], bool):
                raise ValueError(f"company.{key} must be a boolean")
        company.geolocation = geolocation
        company.request_token = request_token or company.request_token
        if flags["revokeRefreshTokens"]:
            for token in company.refresh:
                self._refresh.pop(token, None)
                self._retired[token] = company
            company.refresh.clear()
        if flags["revokeAccessTokens"]:
            self.revoke_access(company)

    def revoke_access(self, company: Company) -> None:
        """Every access token of the company stops working."""
        for token in company.access:
            self._access.pop(token, None)
        company.access.clear()

    def access(self, token: str) -> tuple[Company, float] | None:
        """The company an access token was issued to and when it expires (the hot path)."""
        return self._access.get(token)

    def refresh_entry(self, token: str) -> tuple[Company, str | None, float] | None:
        """A live refresh token's company, the client it is bound to and its expiry."""
        return self._refresh.get(token)

    def retired_owner(self, token: str) -> Company | None:
        """The company a spent or revoked refresh token was issued to."""
        return self._retired.get(token)

    def retire(self, token: str) -> None:
        """Spend a live refresh token (rotation)."""
        entry = self._refresh.pop(token, None)
        if entry is not None:
            entry[0].refresh.discard(token)
            self._retired[token] = entry[0]

    def issue(
        self,
        company: Company,
        client_id: str,
        now: float,
        access_ttl_s: float,
        refresh_ttl_s: float,
    ) -> tuple[str, str]:
        """A new access and refresh token for the company; its expired access tokens go."""
        for token in [t for t, expires in company.access.items() if expires <= now]:
            del company.access[token]
            self._access.pop(token, None)
        access = f"sbx-at-{uuid.uuid4().hex}"
        refresh = f"sbx-rt-{uuid.uuid4().hex}"
        company.access[access] = now + access_ttl_s
        self._access[access] = (company, now + access_ttl_s)
        self._add_refresh(company, refresh, client_id, now + refresh_ttl_s)
        return access, refresh

    def _add_refresh(
        self, company: Company, token: str, client_id: str | None, expires: float
    ) -> None:
        company.refresh.add(token)
        self._refresh[token] = (company, client_id, expires)
