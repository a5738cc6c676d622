"""The sandbox's state and decisions, apart from any HTTP: what each request is answered.

:class:`SandboxCore` holds the configuration (tokens, latency), the scripts, the ledger and the
token endpoint under one lock, and offers the in-process control API (``script``, ``configure``,
``stats``, ...). The HTTP layer (``sandbox.app``) asks it to :meth:`~SandboxCore.decide` each v4
request and to answer each token request; ``sandbox.concur.Sandbox`` adds serving it.

Requests are validated (path, method, token, content type, body schema) *before* any script is
consulted, so an invalid request is always answered 4xx and never uses up a planned answer.
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections.abc import Iterable
from typing import Any

from sandbox.ledger import Ledger
from sandbox.oauth import TokenEndpoint
from sandbox.plans import DEFAULT_KEY, Plan, Script, ScriptKey, is_number, parse_script, pick
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

__all__ = ["CONFIG_KEYS", "SandboxCore"]

CONFIG_KEYS = frozenset({"latencyMs", "latencyP99Ms", "tokens"})
_Z99 = 2.3263  # the standard normal's 99th percentile


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
    ) -> None:
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
        self._bound_port: int | None = None  # set while a server listens

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
        """The server's root, where ``/_sandbox`` and ``/oauth2/v0/token`` live."""
        if self._bound_port is None:
            raise RuntimeError("sandbox has not been started")
        host = self._host
        if host in ("", "0.0.0.0"):
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self._bound_port}"

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
        """Remove every script; how many there were."""
        with self._lock:
            count = len(self._scripts)
            self._scripts.clear()
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
        self, *, user_id: str | None = None, template_id: str | None = None
    ) -> list[dict[str, Any]]:
        """Recorded API requests, oldest first (the last ``max_records`` of them)."""
        with self._lock:
            records = self._ledger.requests(user_id, template_id)
        return [r.to_json() for r in records]

    def stats(self) -> dict[str, Any]:
        """Counters since the last reset (``/_sandbox/stats``)."""
        with self._lock:
            return self._ledger.stats()

    def reset(self) -> None:
        """Forget scripts, records and stats; latency and tokens stay."""
        with self._lock:
            self._scripts.clear()
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

    def connection_opened(self) -> int:
        """Count a new connection; its id (the records' ``connection``)."""
        with self._lock:
            return self._ledger.connection_opened()

    def connection_closed(self) -> None:
        """Count a connection gone."""
        with self._lock:
            self._ledger.connection_closed()

    def token_request(self, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        """Answer one token request (its form fields): the status and the JSON document."""
        with self._lock:
            return self._oauth.grant(form, time.time(), self.root_url)

    def decide(
        self,
        connection: int,
        method: str,
        raw_path: str,
        authorization: str | None,
        content_type: str | None,
        body: bytes,
    ) -> Answer:
        """Validate one v4 request, then ask the scripts; record it and add the latency."""
        user_id = user_id_of(raw_path, self._base_path)
        template_id: str | None = None
        plan: Plan | None = None
        token = bearer(authorization)
        with self._lock:
            now = time.time()
            authorized = self._token_ok(token, now)
            if user_id is None:
                answer = error_answer(404, f"no such resource: {raw_path}")
            elif method != "POST":
                answer = error_answer(405, f"method {method} is not allowed; use POST")
                answer.headers.append(("allow", "POST"))
            elif not authorized:
                answer = error_answer(401, "missing or invalid bearer token")
                answer.headers.append(("www-authenticate", "Bearer"))
            elif (content_type or "").partition(";")[0].strip().lower() != JSON:
                answer = error_answer(415, "Content-Type must be application/json")
            else:
                problems, template_id = validate_body(body)
                if problems:
                    answer = error_answer(400, *problems)
                else:
                    plan = pick(self._scripts, user_id, template_id)
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
            )

    def refuse(
        self, connection: int, method: str, raw_path: str, authorization: str | None, answer: Answer
    ) -> Answer:
        """Record a v4 request refused for its framing (its body unread); add the latency."""
        token = bearer(authorization)
        with self._lock:
            now = time.time()
            authorized = self._token_ok(token, now)
            return self._record(
                now, connection, method, raw_path, None, None, b"", answer, token, authorized
            )

    def _token_ok(self, token: str | None, now: float) -> bool:
        if token is None:
            return False
        return token in self._tokens or self._oauth.access_ok(token, now)

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
        )
        latency = self._latency_s
        if self._latency_sigma > 0:
            latency *= math.exp(random.gauss(0.0, self._latency_sigma))
        answer.delay += latency
        return answer
