"""The sandbox's state and decisions, apart from any HTTP: what each request is answered.

:class:`SandboxCore` holds the configuration (tokens, latency), the scripts, the ledger and the
token endpoint under one lock, and offers the in-process control API (``script``, ``configure``,
``stats``, ...). The HTTP layer (``sandbox.app``) asks it to :meth:`~SandboxCore.decide` each v4
request and to answer each token request; ``sandbox.concur.Sandbox`` adds serving it.

Requests are validated (path, method, token, content type, body schema) *before* any script is
consulted, so an invalid request is always answered 4xx and never uses up a planned answer.

Geolocations: the sandbox answers at one or more named geolocations, each a listening port of
its own (the first is the primary one, ``root_url``), all sharing this one state. The server
layer reports which geolocation received each request; a registered company's access token is
good only at its company's geolocation, the default company's (static tokens and the token
endpoint's default tokens) at every one.
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any

from sandbox.companies import (
    DEFAULT_COMPANY,
    Company,
    parse_companies,
    parse_geolocation_name,
)
from sandbox.ledger import Ledger
from sandbox.oauth import TokenEndpoint
from sandbox.plans import (
    DEFAULT_KEY,
    GeoScript,
    Plan,
    Script,
    ScriptKey,
    is_number,
    parse_geo_script,
    parse_script,
    pick_at,
)
from sandbox.v4 import (
    JSON,
    Answer,
    bearer,
    error_answer,
    planned_answer,
    token_sha,
    user_id_of,
    validate_body,
)

__all__ = ["CONFIG_KEYS", "DEFAULT_GEOLOCATION", "NotFound", "SandboxCore"]

CONFIG_KEYS = frozenset({"latencyMs", "latencyP99Ms", "tokens"})
DEFAULT_GEOLOCATION = "us"
_Z99 = 2.3263  # the standard normal's 99th percentile
_INVALID_TOKEN = "missing or invalid bearer token"


class NotFound(KeyError):
    """A control request named a company or geolocation the sandbox does not have."""


_ELSEWHERE = "the access token is not valid at this geolocation"


class SandboxCore:
    """The fake Notifications v4 API without its server. Methods are safe from any thread."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        tokens: Iterable[str] = ("sandbox-token",),
        latency_ms: float = 0.0,
        latency_p99_ms: float | None = None,
        base_path: str = "/notifications/v4",
        max_records: int = 200_000,
        geolocations: Iterable[str] = (DEFAULT_GEOLOCATION,),
    ) -> None:
        if isinstance(geolocations, str):
            raise TypeError("geolocations must be an iterable of names, not a string")
        names = [parse_geolocation_name(name) for name in geolocations]
        if not names or len(set(names)) != len(names):
            raise ValueError("geolocations must name at least one geolocation, each once")
        self._host = host
        self._port = port
        self._base_path = "/" + base_path.strip("/") if base_path.strip("/") else ""
        # One lock guards all mutable state: the server's loop holds it only for short,
        # await-free sections, so test threads never stall the server noticeably.
        self._lock = threading.Lock()
        self._tokens: frozenset[str] = frozenset()
        self._latency_s = 0.0
        self._latency_sigma = 0.0
        self.configure(latency_ms=latency_ms, latency_p99_ms=latency_p99_ms, tokens=tokens)
        self._scripts: dict[ScriptKey, Script] = {}
        self._ledger = Ledger(max_records)
        self._oauth = TokenEndpoint()
        self._bound_port: int | None = None  # the primary geolocation's, once a server listened
        # name -> the port asked for (0: any free one); the first is the primary.
        self._geolocations: dict[str, int] = {name: 0 for name in names}
        self._geolocations[names[0]] = port
        self._primary = names[0]
        self._roots: dict[str, str] = {}  # name -> root URL, once listened on
        self._port_names: dict[int, str] = {}  # listening port -> geolocation
        self._geo_scripts: dict[str, GeoScript] = {}

    # -- where it is served --------------------------------------------------------------------

    @property
    def base_path(self) -> str:
        """The v4 API's path prefix (``/notifications/v4``, or empty)."""
        return self._base_path

    @property
    def url(self) -> str:
        """The v4 API's base URL (the worker's ``NOTIFY_API_BASE_URL``)."""
        return self.root_url + self._base_path

    @property
    def root_url(self) -> str:
        """The server's root, where ``/_sandbox`` and ``/oauth2/v0/token`` live (the primary
        geolocation's; every geolocation serves them)."""
        if self._bound_port is None:
            raise RuntimeError("sandbox has not been started")
        return self._root_for(self._bound_port)

    def _root_for(self, port: int) -> str:
        host = self._host
        if host in ("", "0.0.0.0"):
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{port}"

    # -- geolocations --------------------------------------------------------------------------

    @property
    def primary_geolocation(self) -> str:
        """The name of the geolocation at :attr:`root_url` (the first one given)."""
        return self._primary

    def geolocations(self) -> dict[str, str]:
        """Each geolocation's root URL (what token answers carry as ``geolocation``; the v4
        API is under it at :attr:`base_path`), by name, the primary first."""
        if self._bound_port is None:
            raise RuntimeError("sandbox has not been started")
        with self._lock:
            return {name: self._roots[name] for name in self._geolocations if name in self._roots}

    def geolocation_names(self) -> list[str]:
        """The geolocations' names, the primary first."""
        with self._lock:
            return list(self._geolocations)

    def geolocation_url(self, name: str) -> str:
        """One geolocation's root URL (:class:`NotFound`, a ``KeyError``, when unknown)."""
        urls = self.geolocations()
        if name not in urls:
            raise NotFound(f"no geolocation {name!r}")
        return urls[name]

    def add_geolocation(self, name: str, port: int = 0) -> dict[str, Any]:
        """Add a geolocation (served at once when the sandbox is; ``port`` 0 picks a free one);
        its description. Adding one that exists changes nothing."""
        name = parse_geolocation_name(name)
        if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
            raise ValueError("port must be an integer 0-65535")
        with self._lock:
            new = name not in self._geolocations
            if new:
                self._geolocations[name] = port
        if new:
            self._serve_geolocation(name, port)
        return self.geolocation(name)

    def geolocation(self, name: str) -> dict[str, Any]:
        """One geolocation's description: name, URLs, script (:class:`NotFound` when unknown)."""
        with self._lock:
            if name not in self._geolocations:
                raise NotFound(f"no geolocation {name!r}")
            root = self._roots.get(name)
            script = self._geo_scripts.get(name)
            return {
                "name": name,
                "primary": name == self._primary,
                "rootUrl": root,
                "url": None if root is None else root + self._base_path,
                "answer": None if script is None or script.answer is None else script.answer.status,
                "delayMs": 0.0 if script is None else script.delay_ms,
            }

    def script_geolocation(
        self, name: str, answer: dict[str, Any] | None = None, delay_ms: float = 0.0
    ) -> None:
        """Script a geolocation: ``answer`` (a planned response, as in :meth:`script`) to every
        valid post there, ``delay_ms`` added to every answer there; both None/0 clear it."""
        raw: dict[str, Any] = {"answer": answer, "delayMs": delay_ms}
        self.install_geolocation_script(name, raw)

    def install_geolocation_script(self, name: str, raw: Any) -> dict[str, Any]:
        """Install a geolocation's script from its JSON (replacing its last); its description."""
        script = parse_geo_script(raw)
        with self._lock:
            if name not in self._geolocations:
                raise NotFound(f"no geolocation {name!r}")
            if script.answer is None and script.delay_ms == 0:
                self._geo_scripts.pop(name, None)
            else:
                self._geo_scripts[name] = script
        return self.geolocation(name)

    def _serve_geolocation(self, name: str, port: int) -> None:
        """Start listening for a geolocation added while serving (the server layer's part)."""

    def _listening(self, name: str, port: int) -> None:
        """The server layer listens for ``name`` on ``port`` (called for each at start)."""
        with self._lock:
            for old, known in list(self._port_names.items()):
                if known == name:
                    del self._port_names[old]
            self._port_names[port] = name
            self._roots[name] = self._root_for(port)
            if name == self._primary:
                self._bound_port = port

    def _ports_wanted(self) -> dict[str, int]:
        """Each geolocation's port to listen on (0: any), for the server layer's start."""
        with self._lock:
            return dict(self._geolocations)

    # -- companies -----------------------------------------------------------------------------

    def create_company(
        self,
        company_id: str,
        *,
        geolocation: str,
        request_token: str,
        refresh_token: str | None = None,
        client_id: str | None = None,
    ) -> dict[str, Any]:
        """Create (or replace) a company living at ``geolocation``; its summary.

        ``request_token`` is what its password grant takes; ``refresh_token``, one it already
        holds (bound to ``client_id`` when given, else to the first client presenting it).
        """
        doc: dict[str, Any] = {
            "id": company_id,
            "geolocation": geolocation,
            "requestToken": request_token,
        }
        if refresh_token is not None:
            doc["refreshToken"] = refresh_token
        if client_id is not None:
            doc["clientId"] = client_id
        self.create_companies([doc])
        return self.company(company_id)

    def create_companies(self, docs: Any) -> int:
        """Create (or replace) many companies in one go from their JSON (a list of
        ``{"id", "geolocation", "requestToken", "refreshToken"?, "clientId"?}``, or a
        ``POST /_sandbox/companies`` document); how many. None is created if one is invalid."""
        if isinstance(docs, list):
            docs = {"companies": docs}
        with self._lock:
            specs = parse_companies(docs, self._geolocations)
            return self._oauth.create_companies(specs, time.time())

    def update_company(
        self,
        company_id: str,
        *,
        geolocation: str | None = None,
        request_token: str | None = None,
        revoke_refresh_tokens: bool = False,
        revoke_access_tokens: bool = False,
    ) -> dict[str, Any]:
        """Move a company, change its request token, revoke its refresh tokens (its next
        refresh grant is answered code 108) or its access tokens (its next post 401)."""
        doc: dict[str, Any] = {
            "geolocation": geolocation,
            "requestToken": request_token,
            "revokeRefreshTokens": revoke_refresh_tokens,
            "revokeAccessTokens": revoke_access_tokens,
        }
        return self.update_company_from(
            company_id, {key: value for key, value in doc.items() if value not in (None, False)}
        )

    def update_company_from(self, company_id: str, doc: Any) -> dict[str, Any]:
        """Apply a ``POST /_sandbox/companies/{id}`` document; the company's summary after it."""
        if not isinstance(doc, dict):
            raise ValueError("company must be an object")
        with self._lock:
            company = self._company(company_id)
            self._oauth.companies.update(company, doc, self._geolocations)
        return self.company(company_id)

    def remove_company(self, company_id: str) -> None:
        """Forget a company (:class:`NotFound` when unknown); its tokens stop working."""
        with self._lock:
            if not self._oauth.companies.remove(company_id):
                raise NotFound(f"no company {company_id!r}")

    def clear_companies(self) -> int:
        """Forget every company; how many there were."""
        with self._lock:
            return self._oauth.companies.clear()

    def company(self, company_id: str) -> dict[str, Any]:
        """One company's summary: its geolocation, token requests and posts (no secret)."""
        with self._lock:
            company = self._company(company_id)
            posts = self._ledger.by_company().get(company.id, (0, 0))
            return self._summary(company, posts, time.time())

    def companies(self) -> dict[str, Any]:
        """Every company's summary, and how many companies made how many token requests
        (``tokenRequestsPerCompany``: ``{"1": 1000}`` is one each for a thousand)."""
        with self._lock:
            now = time.time()
            posts = self._ledger.by_company()
            companies = self._oauth.companies.all()
            histogram: dict[int, int] = {}
            for company in companies:
                histogram[company.token_requests] = histogram.get(company.token_requests, 0) + 1
            return {
                "count": len(companies),
                "tokenRequestsPerCompany": {str(k): v for k, v in sorted(histogram.items())},
                "companies": [self._summary(c, posts.get(c.id, (0, 0)), now) for c in companies],
            }

    def _company(self, company_id: str) -> Company:
        # Called with the lock held.
        company = self._oauth.companies.get(company_id)
        if company is None:
            raise NotFound(f"no company {company_id!r}")
        return company

    def _summary(self, company: Company, posts: tuple[int, int], now: float) -> dict[str, Any]:
        # Called with the lock held.
        doc = company.summary(now)
        doc["rootUrl"] = self._roots.get(company.geolocation)
        doc["posts"], doc["delivered"] = posts
        return doc

    # -- in-process control API ----------------------------------------------------------------

    def script(
        self,
        responses: list[dict[str, Any]] | None = None,
        *,
        template_id: str | None = None,
        user_id: str | None = None,
        then: dict[str, Any] | None = None,
        rate: dict[str, Any] | None = None,
    ) -> None:
        """Plan answers for one user, one template or (neither given) every request."""
        raw: dict[str, Any] = {"match": {}}
        if user_id is not None:
            raw["match"]["userId"] = user_id
        if template_id is not None:
            raw["match"]["templateId"] = template_id
        if responses is not None:
            raw["responses"] = responses
        if then is not None:
            raw["then"] = then
        if rate is not None:
            raw["rate"] = rate
        self.install_script(raw)

    def install_script(self, raw: Any) -> dict[str, Any]:
        """Install a script from its JSON (replacing the one for the same match); a summary."""
        key, script = parse_script(raw)
        with self._lock:
            self._scripts[key] = script
        match = {} if key == DEFAULT_KEY else {key[0]: key[1]}
        return {"match": match, "responses": len(script.pending), "rate": script.rate is not None}

    def clear_scripts(self) -> int:
        """Remove every script, the geolocations' too; how many there were."""
        with self._lock:
            count = len(self._scripts) + len(self._geo_scripts)
            self._scripts.clear()
            self._geo_scripts.clear()
        return count

    def configure(
        self,
        *,
        latency_ms: float | None = None,
        latency_p99_ms: float | None = None,
        tokens: Iterable[str] | None = None,
    ) -> None:
        """Change latency and/or the accepted bearer tokens; applies to the next request.

        With ``latency_p99_ms`` above ``latency_ms``, latency is lognormal: ``latency_ms`` is
        its median and ``latency_p99_ms`` its 99th percentile (a remote API's long tail).
        """
        new_tokens: frozenset[str] | None = None
        if tokens is not None:
            if isinstance(tokens, str):
                raise TypeError("tokens must be an iterable of strings, not a string")
            new_tokens = frozenset(tokens)
            if not all(isinstance(t, str) and t for t in new_tokens):
                raise ValueError("tokens must be non-empty strings")
        if latency_ms is not None and (
            not is_number(latency_ms) or not math.isfinite(latency_ms) or latency_ms < 0
        ):
            raise ValueError("latency_ms must be a non-negative number")
        with self._lock:
            if new_tokens is not None:
                self._tokens = new_tokens
            if latency_ms is not None:
                self._latency_s = float(latency_ms) / 1000.0
            if latency_p99_ms is not None or latency_ms is not None:
                tail = (latency_p99_ms or 0.0) / 1000.0
                self._latency_sigma = (
                    math.log(tail / self._latency_s) / _Z99
                    if self._latency_s > 0 and tail > self._latency_s
                    else 0.0
                )

    def configure_from(self, doc: Any) -> dict[str, Any]:
        """Apply a ``POST /_sandbox/config`` document; the config after it."""
        if not isinstance(doc, dict):
            raise ValueError("config must be an object")
        unknown = sorted(set(doc) - CONFIG_KEYS)
        if unknown:
            raise ValueError(f"config has unknown keys: {', '.join(unknown)}")
        tokens = doc.get("tokens")
        if tokens is not None and not isinstance(tokens, list):
            raise ValueError("tokens must be a list of strings")
        self.configure(
            latency_ms=doc.get("latencyMs"), latency_p99_ms=doc.get("latencyP99Ms"), tokens=tokens
        )
        return self.config()

    def config(self) -> dict[str, Any]:
        """Latency, base path and the tokens (as SHA-256 prefixes: a token is never echoed)."""
        with self._lock:
            return {
                "latencyMs": self._latency_s * 1000.0,
                "latencyP99Ms": self._latency_s * math.exp(_Z99 * self._latency_sigma) * 1000.0,
                "tokenSha256": sorted(token_sha(t) for t in self._tokens),
                "basePath": self._base_path,
            }

    def requests(
        self,
        *,
        user_id: str | None = None,
        template_id: str | None = None,
        company: str | None = None,
        geolocation: str | None = None,
    ) -> list[dict[str, Any]]:
        """Recorded API requests, oldest first (the last ``max_records`` of them); ``company``
        is a company UUID, or ``default`` for the requests that carried no company's token."""
        with self._lock:
            records = self._ledger.requests(user_id, template_id, company, geolocation)
        return [r.to_json() for r in records]

    def stats(
        self, *, company: str | None = None, geolocation: str | None = None
    ) -> dict[str, Any]:
        """Counters since the last reset (``/_sandbox/stats``), over one company's (a UUID, or
        ``default``) and/or one geolocation's requests when asked; with ``company`` a UUID, its
        token requests since it was created too (``tokenRequests``)."""
        with self._lock:
            doc = self._ledger.stats(company, geolocation)
            if company is not None and company != DEFAULT_COMPANY:
                known = self._oauth.companies.get(company)
                doc["tokenRequests"] = 0 if known is None else known.token_requests
            return doc

    def reset(self) -> None:
        """Forget scripts (the geolocations' too), records and stats; latency, tokens,
        geolocations and companies stay."""
        with self._lock:
            self._scripts.clear()
            self._geo_scripts.clear()
            self._ledger.reset()

    # -- the token endpoint's control API ------------------------------------------------------

    def configure_oauth(
        self,
        *,
        failures: Iterable[int] | None = None,
        access_ttl_seconds: float | None = None,
        refresh_ttl_seconds: float | None = None,
        geolocation: str | None = None,
        redirect_to: str | None = None,
        client_secret: str | None = None,
        company_id: str | None = None,
        auth_token: str | None = None,
        revoke_refresh_tokens: bool = False,
        reset: bool = False,
    ) -> None:
        """Change the token endpoint; ``reset`` first forgets every token, counter and setting.

        Arguments left None keep their value (``reset=True`` returns all to the defaults).
        """
        doc: dict[str, Any] = {
            "failures": None if failures is None else list(failures),
            "accessTtlSeconds": access_ttl_seconds,
            "refreshTtlSeconds": refresh_ttl_seconds,
            "geolocation": geolocation,
            "redirectTo": redirect_to,
            "clientSecret": client_secret,
            "companyId": company_id,
            "authToken": auth_token,
            "revokeRefreshTokens": revoke_refresh_tokens,
            "reset": reset,
        }
        self.configure_oauth_from({key: value for key, value in doc.items() if value is not None})

    def configure_oauth_from(self, doc: Any) -> dict[str, Any]:
        """Apply a ``POST /_sandbox/oauth`` document; the token endpoint's stats after it."""
        if not isinstance(doc, dict):
            raise ValueError("oauth must be an object")
        with self._lock:
            self._oauth.configure(doc)
        return self.oauth_stats()

    def issue_refresh_token(self, client_id: str) -> str:
        """A valid refresh token for ``client_id``, as Concur's tools hand one to an admin."""
        with self._lock:
            return self._oauth.issue_refresh_token(client_id, time.time())

    def issued_tokens(self) -> list[str]:
        """Every access and refresh token issued (in-process only: never over HTTP)."""
        with self._lock:
            return self._oauth.issued()

    def oauth_stats(self) -> dict[str, Any]:
        """The token endpoint's counters and request log (no secret in them)."""
        with self._lock:
            return self._oauth.stats(time.time())

    # -- decisions, for the HTTP layer ---------------------------------------------------------

    def connection_opened(self, port: int) -> tuple[int, str]:
        """Count a new connection to a listening port; its id (the records' ``connection``)
        and the geolocation it reached."""
        with self._lock:
            geolocation = self._port_names.get(port, self._primary)
            return self._ledger.connection_opened(geolocation), geolocation

    def connection_closed(self, geolocation: str) -> None:
        """Count a connection gone."""
        with self._lock:
            self._ledger.connection_closed(geolocation)

    def token_request(
        self, form: dict[str, str], geolocation: str | None = None
    ) -> tuple[int, dict[str, Any]]:
        """Answer one token request (its form fields) received at ``geolocation`` (None: the
        primary): the status and the JSON document."""
        with self._lock:
            roots: Mapping[str, str] = self._roots
            return self._oauth.grant(
                form,
                time.time(),
                self.root_url,
                at=geolocation or self._primary,
                roots=roots,
            )

    def decide(
        self,
        connection: int,
        method: str,
        raw_path: str,
        authorization: str | None,
        content_type: str | None,
        body: bytes,
        geolocation: str | None = None,
    ) -> Answer:
        """Validate one v4 request received at ``geolocation`` (None: the primary), then ask
        the scripts; record it and add the latency."""
        user_id = user_id_of(raw_path, self._base_path)
        template_id: str | None = None
        plan: Plan | None = None
        token = bearer(authorization)
        at = geolocation or self._primary
        with self._lock:
            now = time.time()
            authorized, company, refusal = self._authorize(token, now, at)
            if user_id is None:
                answer = error_answer(404, f"no such resource: {raw_path}")
            elif method != "POST":
                answer = error_answer(405, f"method {method} is not allowed; use POST")
                answer.headers.append(("allow", "POST"))
            elif not authorized:
                answer = error_answer(401, refusal)
                answer.headers.append(("www-authenticate", "Bearer"))
            elif (content_type or "").partition(";")[0].strip().lower() != JSON:
                answer = error_answer(415, "Content-Type must be application/json")
            else:
                problems, template_id = validate_body(body)
                if problems:
                    answer = error_answer(400, *problems)
                else:
                    plan = pick_at(self._scripts, self._geo_scripts.get(at), user_id, template_id)
                    answer = Answer(200) if plan is None else planned_answer(plan)
            if plan is None and template_id is None and body:
                # Record which template a rejected request was for, when the body says so.
                _, template_id = validate_body(body)
            return self._record(
                now,
                connection,
                method,
                raw_path,
                user_id,
                template_id,
                body,
                answer,
                token,
                authorized,
                company,
                at,
            )

    def refuse(
        self,
        connection: int,
        method: str,
        raw_path: str,
        authorization: str | None,
        answer: Answer,
        geolocation: str | None = None,
    ) -> Answer:
        """Record a v4 request refused for its framing (its body unread); add the latency."""
        token = bearer(authorization)
        at = geolocation or self._primary
        with self._lock:
            now = time.time()
            authorized, company, _ = self._authorize(token, now, at)
            return self._record(
                now,
                connection,
                method,
                raw_path,
                None,
                None,
                b"",
                answer,
                token,
                authorized,
                company,
                at,
            )

    def _authorize(
        self, token: str | None, now: float, geolocation: str
    ) -> tuple[bool, str | None, str]:
        """Whether the token may post at ``geolocation``, whose company's it is (None: the
        default company's, or nobody's) and why not. Dict lookups only: the hot path."""
        # Called with the lock held.
        if token is None:
            return False, None, _INVALID_TOKEN
        if token in self._tokens or self._oauth.access_ok(token, now):
            return True, None, ""
        found = self._oauth.companies.access(token)
        if found is None:
            return False, None, _INVALID_TOKEN
        company, expires = found
        if expires <= now:
            return False, company.id, _INVALID_TOKEN
        if company.geolocation != geolocation:
            return False, company.id, _ELSEWHERE
        return True, company.id, ""

    def _record(
        self,
        now: float,
        connection: int,
        method: str,
        path: str,
        user_id: str | None,
        template_id: str | None,
        body: bytes,
        answer: Answer,
        token: str | None,
        authorized: bool,
        company: str | None,
        geolocation: str,
    ) -> Answer:
        # Called with the lock held.
        self._ledger.record(
            at=now,
            connection=connection,
            method=method,
            path=path,
            user_id=user_id,
            template_id=template_id,
            body=body,
            status=answer.status,
            fault=answer.fault,
            correlation_id=answer.correlation_id,
            authorized=authorized,
            token=token,
            company=company,
            geolocation=geolocation,
        )
        latency = self._latency_s
        if self._latency_sigma > 0:
            latency *= math.exp(random.gauss(0.0, self._latency_sigma))
        if self._geo_scripts:
            script = self._geo_scripts.get(geolocation)
            if script is not None:
                latency += script.delay_ms / 1000.0  # a slow data center slows every answer
        answer.delay += latency
        return answer
