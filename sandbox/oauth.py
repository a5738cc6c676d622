"""Concur's OAuth2 token endpoint as the sandbox plays it: state and decisions, no I/O.

The password grant (``username`` = company id, ``password`` = auth token,
``credtype=authtoken``) and the ``refresh_token`` grant, both checking ``client_secret`` (any
``client_id``). Every success issues a new access token (lifetime ``accessTtlSeconds``) and a NEW
refresh token, and retires the one presented: a retired, unknown, expired or revoked refresh token
is answered ``400 {"code": 108, ...}`` (a retired one presented again is counted in
``reusedRefreshTokens``). ``failures`` are statuses answered to the next token requests, one each;
``redirectTo`` answers every token request with code 16 and that ``geolocation``.

Besides the default company (``companyId``/``authToken``), the endpoint serves the companies of
:attr:`TokenEndpoint.companies` (``sandbox.companies``): the password grant with a company's
UUID and request token, the refresh grant with a refresh token issued to one, each answered with
that company's own tokens and its geolocation's root URL. A company's token request that reaches
another geolocation is answered as ``redirectTo`` answers (400, code 16, the company's
``geolocation``), after its credentials were checked, and spends nothing. The default company
is served at every geolocation, as before there were several. ``failures``, ``redirectTo`` and
the client secret apply to every token request; ``reset`` leaves the companies alone.

:class:`TokenEndpoint` is not thread-safe: the sandbox calls it under its own lock.
"""

from __future__ import annotations

import math
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sandbox.companies import Companies, Company, CompanySpec
from sandbox.plans import is_number

__all__ = ["OAUTH_KEYS", "TokenEndpoint"]

OAUTH_KEYS = frozenset(
    {
        "failures",
        "accessTtlSeconds",
        "refreshTtlSeconds",
        "geolocation",
        "redirectTo",
        "clientSecret",
        "companyId",
        "authToken",
        "revokeRefreshTokens",
        "reset",
    }
)


@dataclass(slots=True)
class _State:
    """The token endpoint's configuration and what it has issued."""

    client_secret: str = "sandbox-client-secret"
    company_id: str = "sandbox-company"
    auth_token: str = "sandbox-auth-token"
    access_ttl_s: float = 3600.0
    refresh_ttl_s: float = 180 * 86400.0
    geolocation: str | None = None
    redirect_to: str | None = None
    failures: deque[int] = field(default_factory=deque)
    access: dict[str, float] = field(default_factory=dict)  # token -> expires (epoch s)
    refresh: dict[str, tuple[str, float]] = field(default_factory=dict)  # -> (client, expires)
    retired: set[str] = field(default_factory=set)
    issued: list[str] = field(default_factory=list)
    grants: dict[str, int] = field(default_factory=dict)
    codes: dict[int, int] = field(default_factory=dict)
    statuses: dict[int, int] = field(default_factory=dict)
    reused: int = 0
    log: list[dict[str, Any]] = field(default_factory=list)


def _positive(doc: dict[str, Any], key: str) -> float | None:
    value = doc.get(key)
    if value is None:
        return None
    if not is_number(value) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{key} must be a positive number")
    return float(value)


def _url_or_none(doc: dict[str, Any], key: str) -> str | None:
    value = doc.get(key)
    if value is not None and (
        not isinstance(value, str) or not value.startswith(("http://", "https://"))
    ):
        raise ValueError(f"{key} must be an http(s) URL or null")
    return value.rstrip("/") if value else None


class TokenEndpoint:
    """``POST /oauth2/v0/token``'s state machine: settings, live tokens, counters."""

    def __init__(self) -> None:
        self._s = _State()
        self.companies = Companies()

    def configure(self, doc: dict[str, Any]) -> None:
        """Apply a ``/_sandbox/oauth`` document; nothing changes when it is invalid.

        ``reset`` first forgets every token, counter and setting; keys left out keep their value.
        """
        unknown = sorted(set(doc) - OAUTH_KEYS)
        if unknown:
            raise ValueError(f"oauth has unknown keys: {', '.join(unknown)}")
        failures = doc.get("failures")
        if failures is not None and (
            not isinstance(failures, list)
            or not all(
                isinstance(f, int) and not isinstance(f, bool) and 400 <= f <= 599 for f in failures
            )
        ):
            raise ValueError("failures must be a list of integers 400-599")
        access_ttl = _positive(doc, "accessTtlSeconds")
        refresh_ttl = _positive(doc, "refreshTtlSeconds")
        geolocation = _url_or_none(doc, "geolocation")
        redirect_to = _url_or_none(doc, "redirectTo")
        texts = {}
        for key in ("clientSecret", "companyId", "authToken"):
            value = doc.get(key)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"{key} must be a non-empty string")
            texts[key] = value
        if doc.get("reset"):
            self._s = _State()
        s = self._s
        if failures is not None:
            s.failures = deque(failures)
        if access_ttl is not None:
            s.access_ttl_s = access_ttl
        if refresh_ttl is not None:
            s.refresh_ttl_s = refresh_ttl
        if "geolocation" in doc:
            s.geolocation = geolocation
        if "redirectTo" in doc:
            s.redirect_to = redirect_to
        s.client_secret = texts["clientSecret"] or s.client_secret
        s.company_id = texts["companyId"] or s.company_id
        s.auth_token = texts["authToken"] or s.auth_token
        if doc.get("revokeRefreshTokens"):
            s.retired.update(s.refresh)
            s.refresh.clear()

    def access_ok(self, token: str, now: float) -> bool:
        """Whether ``token`` is an access token this endpoint issued and that is still live."""
        expires = self._s.access.get(token)
        return expires is not None and expires > now

    def issue_refresh_token(self, client_id: str, now: float) -> str:
        """A valid refresh token for ``client_id``, as Concur's tools hand one to an admin."""
        token = f"sbx-rt-{uuid.uuid4().hex}"
        self._s.refresh[token] = (client_id, now + self._s.refresh_ttl_s)
        self._s.issued.append(token)
        return token

    def create_companies(self, specs: Iterable[CompanySpec], now: float) -> int:
        """Create (or replace) companies; a refresh token they hold lives ``refreshTtlSeconds``."""
        return self.companies.create(specs, now, self._s.refresh_ttl_s)

    def issued(self) -> list[str]:
        """Every access and refresh token issued, oldest first."""
        return list(self._s.issued)

    def stats(self, now: float) -> dict[str, Any]:
        """The counters and request log (no secret in them)."""
        s = self._s
        return {
            "grants": dict(s.grants),
            "codes": {str(k): v for k, v in sorted(s.codes.items())},
            "byStatus": {str(k): v for k, v in sorted(s.statuses.items())},
            "reusedRefreshTokens": s.reused,
            "failuresLeft": len(s.failures),
            "liveAccessTokens": sum(1 for t in s.access.values() if t > now),
            "liveRefreshTokens": len(s.refresh),
            "accessTtlSeconds": s.access_ttl_s,
            "requests": list(s.log),
        }

    def grant(
        self,
        form: dict[str, str],
        now: float,
        default_geolocation: str,
        *,
        at: str | None = None,
        roots: Mapping[str, str] | None = None,
    ) -> tuple[int, dict[str, Any]]:
        """Answer one token request (its form fields): the status and the JSON document.

        ``at`` names the geolocation that received it and ``roots`` maps each geolocation to
        its root URL (None: a single geolocation, where every company lives).
        """
        s = self._s
        grant_type = form.get("grant_type", "")
        client_id = form.get("client_id", "")
        company = self._company_of(grant_type, form)

        def done(status: int, doc: dict[str, Any]) -> tuple[int, dict[str, Any]]:
            code = doc.get("code")
            if isinstance(code, int):
                s.codes[code] = s.codes.get(code, 0) + 1
            s.statuses[status] = s.statuses.get(status, 0) + 1
            entry: dict[str, Any] = {
                "at": now,
                "grantType": grant_type,
                "status": status,
                "code": code,
            }
            if company is not None:
                entry["company"] = company.id
                company.token_requests += 1
                if isinstance(code, int):
                    company.codes[code] = company.codes.get(code, 0) + 1
                elif status == 200:
                    company.grants[grant_type] = company.grants.get(grant_type, 0) + 1
            if at is not None:
                entry["geolocation"] = at
            s.log.append(entry)
            return status, doc

        def moved(geolocation: str) -> tuple[int, dict[str, Any]]:
            return done(
                400,
                {
                    "code": 16,
                    "error": "invalid_grant",
                    "error_description": "the principal lives in another geolocation",
                    "geolocation": geolocation,
                },
            )

        def refused(
            status: int, error: str, description: str, code: int | None = None
        ) -> tuple[int, dict[str, Any]]:
            doc: dict[str, Any] = {"error": error, "error_description": description}
            if code is not None:
                doc["code"] = code
            return done(status, doc)

        if s.failures:
            status = s.failures.popleft()
            return refused(status, "server_error", f"scripted {status}")
        if s.redirect_to:
            return moved(s.redirect_to)
        if not client_id or form.get("client_secret") != s.client_secret:
            return refused(401, "invalid_client", "unknown client or wrong secret")
        if company is not None:
            if grant_type == "password":
                if (
                    form.get("credtype") != "authtoken"
                    or form.get("password") != company.request_token
                ):
                    return refused(400, "invalid_grant", "bad company id or auth token")
            else:
                presented = form.get("refresh_token", "")
                held = self.companies.refresh_entry(presented)
                if held is None or held[1] not in (None, client_id) or held[2] <= now:
                    if held is None:
                        s.reused += 1  # only a spent or revoked token names its company here
                    return refused(400, "invalid_grant", "bad or expired refresh token", 108)
            home = company.geolocation
            root = (roots or {}).get(home, default_geolocation)
            if at is not None and at != home:
                return moved(root)  # the credentials stay good for the right geolocation
            if grant_type == "refresh_token":
                self.companies.retire(form.get("refresh_token", ""))
            access, refresh = self.companies.issue(
                company, client_id, now, s.access_ttl_s, s.refresh_ttl_s
            )
            return self._granted(done, grant_type, access, refresh, now, root)
        if grant_type == "password":
            if (
                form.get("credtype") != "authtoken"
                or form.get("username") != s.company_id
                or form.get("password") != s.auth_token
            ):
                return refused(400, "invalid_grant", "bad company id or auth token")
        elif grant_type == "refresh_token":
            presented = form.get("refresh_token", "")
            entry = s.refresh.get(presented)
            if entry is None or entry[0] != client_id or entry[1] <= now:
                if presented in s.retired:
                    s.reused += 1
                return refused(400, "invalid_grant", "bad or expired refresh token", 108)
            del s.refresh[presented]
            s.retired.add(presented)
        else:
            return refused(400, "unsupported_grant_type", "use password or refresh_token")
        access = f"sbx-at-{uuid.uuid4().hex}"
        refresh = f"sbx-rt-{uuid.uuid4().hex}"
        s.access[access] = now + s.access_ttl_s
        s.refresh[refresh] = (client_id, now + s.refresh_ttl_s)
        return self._granted(
            done, grant_type, access, refresh, now, s.geolocation or default_geolocation
        )

    def _company_of(self, grant_type: str, form: dict[str, str]) -> Company | None:
        """The registered company a token request is for (None: the default company)."""
        if grant_type == "password":
            username = form.get("username", "")
            if username == self._s.company_id:
                return None
            return self.companies.get(username)
        if grant_type == "refresh_token":
            presented = form.get("refresh_token", "")
            entry = self.companies.refresh_entry(presented)
            return entry[0] if entry is not None else self.companies.retired_owner(presented)
        return None

    def _granted(
        self,
        done: Callable[[int, dict[str, Any]], tuple[int, dict[str, Any]]],
        grant_type: str,
        access: str,
        refresh: str,
        now: float,
        geolocation: str,
    ) -> tuple[int, dict[str, Any]]:
        s = self._s
        s.issued.extend((access, refresh))
        s.grants[grant_type] = s.grants.get(grant_type, 0) + 1
        return done(
            200,
            {
                "expires_in": f"{s.access_ttl_s:g}",
                "scope": "notifications.messages.writeonly",
                "token_type": "Bearer",
                "access_token": access,
                "refresh_token": refresh,
                "refresh_expires_in": int(now + s.refresh_ttl_s),
                "geolocation": geolocation,
                "id_token": "sandbox-id-token",
            },
        )
