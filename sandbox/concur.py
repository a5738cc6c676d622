"""Local stand-in for the SAP Concur Notifications v4 API.

The sandbox is a small asyncio HTTP/1.1 server (stdlib only) that speaks the one endpoint the
worker calls::

    POST {base_path}/messages/{userId}/session        base_path defaults to /notifications/v4
    Authorization: Bearer <token>
    Content-Type: application/json
    {"sessionId": "...", "templateId": "...", "context": {"url": "..."}}

It answers 200 with an empty body, or the seed's ErrorMessage
``{"errors": [{"errorId", "errorCode", "errorMessage"}]}`` for 400/401/404/405/415, and every
response carries a fresh ``concur-correlationid``. Requests are validated (path, method, token,
content type, body schema) *before* any script is consulted, so an invalid request is always
answered 4xx.

It is used by the tests (in a background thread), by the local dev stack and by the throughput
benchmark (in the foreground via :func:`main`). Latency is an ``asyncio.sleep``, so thousands of
slow requests can be in flight at once.

Scripts plan what the API answers. Each script matches one userId, one templateId or everything
(precedence: userId, templateId, default, plain 200). Its ``responses`` are consumed one per
matching request; afterwards ``then`` (default ``{"status": 200}``) answers. ``rate`` replaces
``responses`` with random flapping. A planned response is
``{"status", "retryAfter", "delayMs", "errors", "body", "contentType", "hang", "drop"}``, all
optional except ``status``. ``hang`` holds the request until the client gives up; ``drop`` reads
it and closes the connection without a word, as a crashed server or a resetting proxy does.
Posting a script for a match that already has one replaces it.

Control endpoints (JSON, no auth, always at the server root, never delayed):

* ``POST /_sandbox/scripts`` one script ``{"match", "responses" | "rate", "then"}`` -> 201
* ``DELETE /_sandbox/scripts`` clears all scripts -> 200
* ``GET|POST /_sandbox/config`` ``{"latencyMs": 20, "tokens": ["t1"]}`` -> 200 current config
  (tokens are reported as ``tokenSha256`` prefixes, never echoed)
* ``GET /_sandbox/requests[?userId=..&templateId=..]`` -> ``{"requests": [...]}``
* ``GET /_sandbox/stats`` -> ``{"total", "byStatus", "delivered", "perSecond", "maxPerSecond",
  "hung", "dropped", "connections", "openConnections"}``
* ``POST /_sandbox/reset`` clears scripts, records and stats; config stays -> 200
* ``GET|POST /_sandbox/oauth`` ``{"failures": [503, 503], "accessTtlSeconds": 2,
  "refreshTtlSeconds", "geolocation", "redirectTo", "clientSecret", "companyId", "authToken",
  "revokeRefreshTokens": true, "reset": true}`` -> 200 the token endpoint's counters

The token endpoint ``POST /oauth2/v0/token`` (form-encoded, at the server root) plays Concur's
OAuth2: the password grant (``username`` = company id, ``password`` = auth token,
``credtype=authtoken``) and the ``refresh_token`` grant, both checking ``client_secret`` (any
``client_id``). Every success issues a new access token (lifetime ``accessTtlSeconds``, accepted
by the v4 endpoint besides the configured static tokens) and a NEW refresh token, and retires the
one presented: a retired, unknown, expired or revoked refresh token is answered
``400 {"code": 108, ...}`` (a retired one presented again is counted in ``reusedRefreshTokens``).
``failures`` are statuses answered to the next token requests, one each; ``redirectTo`` answers
every token request with code 16 and that ``geolocation``; ``geolocation`` is what a success
reports (default: the sandbox's own root URL). Token requests are counted apart from the v4
requests (``GET /_sandbox/oauth``), never echoing a secret.

A request is recorded (and counted) when its answer is decided, before any latency: a 200 that
the client gave up waiting for still counts as delivered, as it would on the real API. A hung
request is recorded with ``"status": null`` and counted in ``hung``, not ``byStatus``; so is a
dropped one, counted in ``dropped``.

Example::

    with Sandbox(latency_ms=20) as sandbox:
        sandbox.script([{"status": 503, "retryAfter": "2"}], template_id="welcome")
        r = httpx.post(f"{sandbox.url}/messages/u1/session",
                       headers={"Authorization": "Bearer sandbox-token"},
                       json={"sessionId": "s1", "templateId": "welcome", "context": {}})
        assert r.status_code == 503  # the next "welcome" request gets 200
        assert sandbox.stats()["byStatus"] == {"503": 1}

From a shell: ``python sandbox/concur.py --port 8099 --latency-ms 20 --token dev-token``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import math
import random
import signal
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qs, unquote

__all__ = ["Sandbox", "main"]

MAX_HEADER_BYTES = 16 * 1024
MAX_BODY_BYTES = 64 * 1024
CONTROL_PREFIX = "/_sandbox"

_BODY_KEYS = frozenset({"sessionId", "templateId", "context"})
_PLAN_KEYS = frozenset(
    {"status", "retryAfter", "delayMs", "errors", "body", "contentType", "hang", "drop"}
)
_RATE_KEYS = frozenset({"errorRatio", "statuses", "hangRatio", "seed"})
_SCRIPT_KEYS = frozenset({"match", "responses", "then", "rate"})
_CONFIG_KEYS = frozenset({"latencyMs", "latencyP99Ms", "tokens"})
_Z99 = 2.3263  # the standard normal's 99th percentile
_OAUTH_KEYS = frozenset(
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
_JSON = "application/json"
_FORM = "application/x-www-form-urlencoded"
TOKEN_PATH = "/oauth2/v0/token"

# Codes the seed uses where HTTPStatus' own name would differ from what clients match on.
_ERROR_CODES = {
    400: "INVALID_BODY",
    413: "PAYLOAD_TOO_LARGE",
    415: "UNSUPPORTED_MEDIA_TYPE",
}


class _HttpError(Exception):
    """A request that cannot be framed; the connection is closed after answering it."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True, slots=True)
class _Plan:
    status: int = 200
    retry_after: str | None = None
    delay_ms: float = 0.0
    errors: tuple[dict[str, Any], ...] | None = None
    body: str | None = None
    content_type: str | None = None
    hang: bool = False
    drop: bool = False


@dataclass(slots=True)
class _Rate:
    error_ratio: float
    hang_ratio: float
    statuses: tuple[int, ...]
    rng: random.Random


@dataclass(slots=True)
class _Script:
    pending: deque[_Plan]
    then: _Plan
    rate: _Rate | None


@dataclass(slots=True)
class _Record:
    # Slotted and holding the raw body: 200k of these must stay small in a long benchmark.
    seq: int
    at: float
    method: str
    path: str
    user_id: str | None
    template_id: str | None
    body: bytes
    status: int | None
    correlation_id: str
    authorized: bool
    token_sha: str | None
    connection: int

    def to_json(self) -> dict[str, Any]:
        parsed: Any = None
        if self.body:
            with contextlib.suppress(ValueError, RecursionError):
                parsed = json.loads(self.body)
        return {
            "seq": self.seq,
            "at": self.at,
            "method": self.method,
            "path": self.path,
            "userId": self.user_id,
            "templateId": self.template_id,
            "body": parsed,
            "status": self.status,
            "correlationId": self.correlation_id,
            "authorized": self.authorized,
            "tokenSha256": self.token_sha,
            "connection": self.connection,
        }


@dataclass(slots=True)
class _Answer:
    status: int
    body: bytes = b""
    content_type: str | None = None
    headers: list[tuple[str, str]] = field(default_factory=list)
    delay: float = 0.0
    hang: bool = False
    drop: bool = False
    correlation_id: str = field(default_factory=lambda: str(uuid.uuid4()))


def _token_sha(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()[:12]


def _error_code(status: int) -> str:
    if status in _ERROR_CODES:
        return _ERROR_CODES[status]
    try:
        return HTTPStatus(status).name
    except ValueError:
        return f"HTTP_{status}"


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


def _error_json(status: int, *messages: str, code: str | None = None) -> bytes:
    errors = [
        {
            "errorId": str(uuid.uuid4()),
            "errorCode": code or _error_code(status),
            "errorMessage": message,
        }
        for message in messages
    ]
    return json.dumps({"errors": errors}).encode()


def _error_answer(status: int, *messages: str, code: str | None = None) -> _Answer:
    return _Answer(status, _error_json(status, *messages, code=code), _JSON)


def _json_answer(status: int, doc: Any) -> _Answer:
    return _Answer(status, json.dumps(doc).encode(), _JSON)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _header_safe(value: str, name: str) -> str:
    # Values go verbatim into the response head; a CR/LF would let a script corrupt framing.
    try:
        value.encode("latin-1")
    except UnicodeEncodeError:
        raise ValueError(f"{name} must be latin-1 text") from None
    if "\r" in value or "\n" in value:
        raise ValueError(f"{name} must not contain line breaks")
    return value


def _parse_plan(raw: Any, where: str) -> _Plan:
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
        if _is_number(retry_after):
            retry_after = str(retry_after)
        if not isinstance(retry_after, str):
            raise ValueError(f"{where}.retryAfter must be a string or number")
        _header_safe(retry_after, f"{where}.retryAfter")
    delay_ms = raw.get("delayMs", 0)
    if not _is_number(delay_ms) or not math.isfinite(delay_ms) or delay_ms < 0:
        raise ValueError(f"{where}.delayMs must be a non-negative number")
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
    hang = raw.get("hang", False)
    if not isinstance(hang, bool):
        raise ValueError(f"{where}.hang must be a boolean")
    drop = raw.get("drop", False)
    if not isinstance(drop, bool):
        raise ValueError(f"{where}.drop must be a boolean")
    return _Plan(
        status=status,
        retry_after=retry_after,
        delay_ms=float(delay_ms),
        errors=None if errors is None else tuple(dict(e) for e in errors),
        body=body,
        content_type=content_type,
        hang=hang,
        drop=drop,
    )


def _ratio(raw: dict[str, Any], key: str) -> float:
    value = raw.get(key, 0.0)
    if not _is_number(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"rate.{key} must be a number between 0 and 1")
    return float(value)


def _parse_rate(raw: Any) -> _Rate:
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
    return _Rate(error_ratio, hang_ratio, tuple(statuses), random.Random(seed))


def _parse_script(raw: Any) -> tuple[tuple[str, str], _Script]:
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
    key = ("default", "")
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
    pending = deque(_parse_plan(r, f"responses[{i}]") for i, r in enumerate(responses))
    then = _parse_plan(raw.get("then", {"status": 200}), "then")
    return key, _Script(pending, then, None if rate is None else _parse_rate(rate))


def _validate_body(body: bytes) -> tuple[list[str], str | None]:
    """Return one message per schema problem, plus the templateId when there is a usable one."""
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        return ["request body is not valid JSON"], None
    if not isinstance(doc, dict):
        return ["request body must be a JSON object"], None
    problems: list[str] = []
    for name in ("sessionId", "templateId"):
        if name not in doc:
            problems.append(f"{name} is required")
        elif not isinstance(doc[name], str):
            problems.append(f"{name} must be a string")
        elif not doc[name].strip():
            problems.append(f"{name} must not be empty")
    if "context" not in doc:
        problems.append("context is required")
    elif not isinstance(doc["context"], dict):
        problems.append("context must be an object")
    elif "url" in doc["context"] and not isinstance(doc["context"]["url"], str):
        problems.append("context.url must be a string")
    problems.extend(f"unknown field: {name}" for name in sorted(set(doc) - _BODY_KEYS))
    template = doc.get("templateId")
    return problems, template if isinstance(template, str) else None


def _bearer(value: str | None) -> str | None:
    if value is None:
        return None
    parts = value.split()
    if len(parts) != 2 or parts[0].lower() != "bearer":
        return None
    return parts[1]


def _parse_head(head: bytes) -> tuple[str, str, str, dict[str, str]]:
    lines = head[:-4].decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise _HttpError(400, "malformed request line")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise _HttpError(400, "malformed header line")
        key = name.lower()
        value = value.strip()
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    return parts[0], parts[1], parts[2], headers


def _render(answer: _Answer, *, close: bool, head_only: bool = False) -> bytes:
    lines = [f"HTTP/1.1 {answer.status} {_reason(answer.status)}"]
    lines.append(f"concur-correlationid: {answer.correlation_id}")
    if answer.content_type:
        lines.append(f"content-type: {answer.content_type}")
    lines.extend(f"{name}: {value}" for name, value in answer.headers)
    lines.append(f"content-length: {len(answer.body)}")
    lines.append("connection: close" if close else "connection: keep-alive")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head if head_only else head + answer.body


async def _wait_for_eof(reader: asyncio.StreamReader) -> None:
    while await reader.read(65536):
        pass


@dataclass(slots=True)
class _OAuth:
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
    if not _is_number(value) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{key} must be a positive number")
    return float(value)


def _url_or_none(doc: dict[str, Any], key: str) -> str | None:
    value = doc.get(key)
    if value is not None and (
        not isinstance(value, str) or not value.startswith(("http://", "https://"))
    ):
        raise ValueError(f"{key} must be an http(s) URL or null")
    return value.rstrip("/") if value else None


class Sandbox:
    """The fake Notifications v4 API. Methods are safe to call from any thread."""

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
        # One lock guards all mutable state: the loop thread holds it only for short,
        # await-free sections, so test threads never stall the server noticeably.
        self._lock = threading.Lock()
        self._tokens: frozenset[str] = frozenset()
        self._latency_s = 0.0
        self._latency_sigma = 0.0
        self.configure(latency_ms=latency_ms, latency_p99_ms=latency_p99_ms, tokens=tokens)
        self._scripts: dict[tuple[str, str], _Script] = {}
        self._records: deque[_Record] = deque(maxlen=max_records)
        self._sha_cache: dict[str, str] = {}
        self._seq = 0
        self._reset_stats()
        self._conn_seq = 0
        self._open_connections = 0
        self._conn_tasks: set[asyncio.Task[Any]] = set()
        self._lifecycle = threading.Lock()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._bound_port: int | None = None
        self._startup_error: BaseException | None = None
        self._oauth = _OAuth()

    # -- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> Sandbox:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> str:
        """Serve from a daemon thread; return the base URL once the socket is listening."""
        with self._lifecycle:
            if self._thread is not None:
                return self.url
            if self._loop is not None:
                raise RuntimeError("sandbox is already serving in the foreground")
            ready = threading.Event()
            self._startup_error = None
            thread = threading.Thread(
                target=self._run_thread, args=(ready,), name="concur-sandbox", daemon=True
            )
            thread.start()
            ready.wait()
            if self._startup_error is not None:
                thread.join()
                raise RuntimeError("sandbox failed to start") from self._startup_error
            self._thread = thread
        return self.url

    def stop(self) -> None:
        """Stop serving (dropping hung and delayed requests) and join the thread; idempotent."""
        with self._lifecycle:
            loop, event = self._loop, self._stop_event
            if loop is not None and event is not None:
                # The loop may have closed between the read and the call.
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(event.set)
            if self._thread is not None:
                self._thread.join()
                self._thread = None

    def serve_forever(self) -> None:
        """Serve in the calling thread until SIGINT/SIGTERM or :meth:`stop`."""
        self._run_foreground(None)

    def _run_foreground(self, on_ready: Callable[[], None] | None) -> None:
        if self._thread is not None:
            raise RuntimeError("sandbox is already serving in a background thread")
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(self._serve(on_ready, install_signals=True))

    def _run_thread(self, ready: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(self._serve(ready.set, install_signals=False))
        except BaseException as exc:
            self._startup_error = exc
        finally:
            ready.set()
            loop.close()

    async def _serve(self, on_ready: Callable[[], None] | None, *, install_signals: bool) -> None:
        loop = asyncio.get_running_loop()
        stop_event = asyncio.Event()
        if install_signals:
            for sig in (signal.SIGINT, signal.SIGTERM):
                # Only possible on the main thread of a Unix process; elsewhere stop() ends it.
                with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                    loop.add_signal_handler(sig, stop_event.set)
        server = await asyncio.start_server(
            self._handle_connection,
            self._host,
            self._port,
            limit=MAX_HEADER_BYTES,
            backlog=2048,
        )
        self._bound_port = int(server.sockets[0].getsockname()[1])
        self._loop, self._stop_event = loop, stop_event
        try:
            if on_ready is not None:
                on_ready()
            await stop_event.wait()
        finally:
            self._loop = self._stop_event = None
            server.close()
            tasks = list(self._conn_tasks)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await server.wait_closed()

    @property
    def url(self) -> str:
        return self.root_url + self._base_path

    @property
    def root_url(self) -> str:
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
        self._install_script(raw)

    def _install_script(self, raw: Any) -> dict[str, Any]:
        key, script = _parse_script(raw)
        with self._lock:
            self._scripts[key] = script
        match = {} if key[0] == "default" else {key[0]: key[1]}
        return {"match": match, "responses": len(script.pending), "rate": script.rate is not None}

    def clear_scripts(self) -> int:
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
            not _is_number(latency_ms) or not math.isfinite(latency_ms) or latency_ms < 0
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

    def config(self) -> dict[str, Any]:
        with self._lock:
            return {
                "latencyMs": self._latency_s * 1000.0,
                "latencyP99Ms": self._latency_s * math.exp(_Z99 * self._latency_sigma) * 1000.0,
                "tokenSha256": sorted(_token_sha(t) for t in self._tokens),
                "basePath": self._base_path,
            }

    def requests(
        self, *, user_id: str | None = None, template_id: str | None = None
    ) -> list[dict[str, Any]]:
        """Recorded API requests, oldest first (the last ``max_records`` of them)."""
        with self._lock:
            records = list(self._records)
        return [
            r.to_json()
            for r in records
            if (user_id is None or r.user_id == user_id)
            and (template_id is None or r.template_id == template_id)
        ]

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "total": self._total,
                "byStatus": {str(k): v for k, v in sorted(self._by_status.items())},
                "delivered": self._delivered,
                # When the first and the latest 2xx were decided (epoch seconds): rates taken
                # between them leave out the clients' start-up.
                "firstDeliveredAt": self._first_delivered_at,
                "lastDeliveredAt": self._last_delivered_at,
                "perSecond": {str(k): v for k, v in sorted(self._per_second.items())},
                "maxPerSecond": self._max_per_second,
                "hung": self._hung,
                "dropped": self._dropped,
                "connections": self._connections,
                "openConnections": self._open_connections,
            }

    def reset(self) -> None:
        """Forget scripts, records and stats; latency and tokens stay."""
        with self._lock:
            self._scripts.clear()
            self._records.clear()
            self._seq = 0
            self._reset_stats()

    def _reset_stats(self) -> None:
        self._total = 0
        self._by_status: dict[int, int] = {}
        self._delivered = 0
        self._first_delivered_at: float | None = None
        self._last_delivered_at: float | None = None
        self._per_second: dict[int, int] = {}
        self._max_per_second = 0
        self._hung = 0
        self._dropped = 0
        self._connections = 0

    # -- connection handling -------------------------------------------------------------------

    async def _handle_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._conn_tasks.add(task)
        with self._lock:
            self._conn_seq += 1
            conn_id = self._conn_seq
            self._connections += 1
            self._open_connections += 1
        try:
            await self._serve_connection(conn_id, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away mid-request; nothing left to answer
        except asyncio.CancelledError:
            # Only stop() cancels these tasks. Re-raising would make asyncio.streams (3.11)
            # log a traceback for every open connection, since it calls task.exception().
            pass
        finally:
            with self._lock:
                self._open_connections -= 1
            if task is not None:
                self._conn_tasks.discard(task)
            writer.close()

    async def _serve_connection(
        self, conn_id: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                return  # clean close between requests
            except asyncio.LimitOverrunError:
                writer.write(
                    _render(_error_answer(413, "request headers exceed 16 KiB"), close=True)
                )
                await writer.drain()
                return
            try:
                method, target, version, headers = _parse_head(head)
            except _HttpError as exc:
                writer.write(_render(_error_answer(exc.status, exc.message), close=True))
                await writer.drain()
                return
            try:
                body = await self._read_body(headers, reader, writer)
            except _HttpError as exc:
                # The body was not consumed, so the stream is out of sync: answer and close.
                answer = _error_answer(exc.status, exc.message)
                if not self._is_control(target):
                    path = target.partition("?")[0]
                    answer = self._record_answer(
                        conn_id, method, path, None, None, headers, b"", answer, None
                    )
                writer.write(_render(answer, close=True))
                await writer.drain()
                return
            connection = {t.strip() for t in headers.get("connection", "").lower().split(",")}
            keep_alive = "close" not in connection and (
                version != "HTTP/1.0" or "keep-alive" in connection
            )
            answer = self._route(conn_id, method, target, headers, body)
            if answer.hang:
                await _wait_for_eof(reader)
                return
            if answer.drop:
                return  # the connection closes unanswered
            if answer.delay > 0:
                await asyncio.sleep(answer.delay)
            writer.write(_render(answer, close=not keep_alive, head_only=method == "HEAD"))
            await writer.drain()
            if not keep_alive:
                return

    @staticmethod
    async def _read_body(
        headers: dict[str, str], reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bytes:
        if "transfer-encoding" in headers:
            raise _HttpError(411, "chunked request bodies are not supported; send Content-Length")
        length = headers.get("content-length", "0")
        if not length.isdigit():
            raise _HttpError(400, "invalid Content-Length")
        size = int(length)
        if size > MAX_BODY_BYTES:
            raise _HttpError(413, "request body exceeds 64 KiB")
        if size == 0:
            return b""
        if headers.get("expect", "").lower() == "100-continue":
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        return await reader.readexactly(size)

    @staticmethod
    def _is_control(target: str) -> bool:
        path = target.partition("?")[0]
        return path == CONTROL_PREFIX or path.startswith(CONTROL_PREFIX + "/")

    def _route(
        self, conn_id: int, method: str, target: str, headers: dict[str, str], body: bytes
    ) -> _Answer:
        if self._is_control(target):
            return self._control(method, target, body)
        if target.partition("?")[0] == TOKEN_PATH:
            return self._token_endpoint(method, headers, body)
        return self._api(conn_id, method, target, headers, body)

    # -- the Notifications v4 endpoint -------------------------------------------------------

    def _user_id(self, path: str) -> str | None:
        prefix = self._base_path + "/messages/"
        if not path.startswith(prefix) or not path.endswith("/session"):
            return None
        segment = path[len(prefix) : -len("/session")]
        if not segment or "/" in segment:
            return None
        return unquote(segment)

    def _api(
        self, conn_id: int, method: str, target: str, headers: dict[str, str], body: bytes
    ) -> _Answer:
        path = target.partition("?")[0]
        user_id = self._user_id(path)
        template_id: str | None = None
        plan: _Plan | None = None
        token = _bearer(headers.get("authorization"))
        if user_id is None:
            answer = _error_answer(404, f"no such resource: {path}")
        elif method != "POST":
            answer = _error_answer(405, f"method {method} is not allowed; use POST")
            answer.headers.append(("allow", "POST"))
        elif not self._token_ok(token):
            answer = _error_answer(401, "missing or invalid bearer token")
            answer.headers.append(("www-authenticate", "Bearer"))
        elif headers.get("content-type", "").partition(";")[0].strip().lower() != _JSON:
            answer = _error_answer(415, "Content-Type must be application/json")
        else:
            problems, template_id = _validate_body(body)
            if problems:
                answer = _error_answer(400, *problems)
            else:
                answer = _Answer(200)
                plan = self._next_plan(user_id, template_id)
        if plan is None and template_id is None and body:
            # Record which template a rejected request was for, when the body says so.
            _, template_id = _validate_body(body)
        return self._record_answer(
            conn_id, method, path, user_id, template_id, headers, body, answer, plan
        )

    def _next_plan(self, user_id: str, template_id: str | None) -> _Plan | None:
        with self._lock:
            script = self._scripts.get(("userId", user_id))
            if script is None and template_id is not None:
                script = self._scripts.get(("templateId", template_id))
            if script is None:
                script = self._scripts.get(("default", ""))
            if script is None:
                return None
            if script.pending:
                return script.pending.popleft()
            rate = script.rate
            if rate is not None:
                roll = rate.rng.random()
                if roll < rate.hang_ratio:
                    return _Plan(hang=True)
                if roll < rate.hang_ratio + rate.error_ratio:
                    return _Plan(status=rate.rng.choice(rate.statuses))
            return script.then

    @staticmethod
    def _planned_answer(plan: _Plan) -> _Answer:
        answer = _Answer(plan.status, hang=plan.hang, drop=plan.drop, delay=plan.delay_ms / 1000.0)
        if plan.body is not None:
            answer.body = plan.body.encode("utf-8")
            answer.content_type = plan.content_type or _JSON
        elif plan.errors is not None:
            errors = [
                {"errorId": str(uuid.uuid4()), **e} if "errorId" not in e else dict(e)
                for e in plan.errors
            ]
            answer.body = json.dumps({"errors": errors}).encode()
            answer.content_type = plan.content_type or _JSON
        elif plan.status >= 300:
            answer.body = _error_json(plan.status, f"scripted {plan.status} {_reason(plan.status)}")
            answer.content_type = plan.content_type or _JSON
        elif plan.content_type is not None:
            answer.content_type = plan.content_type
        if plan.retry_after is not None:
            answer.headers.append(("retry-after", plan.retry_after))
        return answer

    def _record_answer(
        self,
        conn_id: int,
        method: str,
        path: str,
        user_id: str | None,
        template_id: str | None,
        headers: dict[str, str],
        body: bytes,
        answer: _Answer,
        plan: _Plan | None,
    ) -> _Answer:
        if plan is not None:
            answer = self._planned_answer(plan)
        token = _bearer(headers.get("authorization"))
        now = time.time()
        with self._lock:
            latency = self._latency_s
            if self._latency_sigma > 0:
                latency *= math.exp(random.gauss(0.0, self._latency_sigma))
            authorized = self._token_ok(token)
            token_sha: str | None = None
            if token is not None:
                token_sha = self._sha_cache.get(token)
                if token_sha is None:
                    token_sha = _token_sha(token)
                    # Bounded so a client spraying random tokens cannot grow it forever.
                    if len(self._sha_cache) < 1024:
                        self._sha_cache[token] = token_sha
            self._seq += 1
            self._total += 1
            status: int | None = None
            if answer.hang:
                self._hung += 1
            elif answer.drop:
                self._dropped += 1
            else:
                status = answer.status
                self._by_status[status] = self._by_status.get(status, 0) + 1
                if 200 <= status < 300:
                    self._delivered += 1
                    if self._first_delivered_at is None:
                        self._first_delivered_at = now
                    self._last_delivered_at = now
                    second = int(now)
                    count = self._per_second.get(second, 0) + 1
                    self._per_second[second] = count
                    self._max_per_second = max(self._max_per_second, count)
            self._records.append(
                _Record(
                    seq=self._seq,
                    at=now,
                    method=method,
                    path=path,
                    user_id=user_id,
                    template_id=template_id,
                    body=body,
                    status=status,
                    correlation_id=answer.correlation_id,
                    authorized=authorized,
                    token_sha=token_sha,
                    connection=conn_id,
                )
            )
        answer.delay += latency
        return answer

    # -- control endpoints ---------------------------------------------------------------------

    def _control(self, method: str, target: str, body: bytes) -> _Answer:
        path, _, query = target.partition("?")
        path = path.rstrip("/") or "/"
        routes: dict[str, dict[str, Callable[[], _Answer]]] = {
            "/_sandbox/scripts": {
                "POST": lambda: _json_answer(201, self._install_script(self._json_doc(body))),
                "DELETE": lambda: _json_answer(200, {"cleared": self.clear_scripts()}),
            },
            "/_sandbox/config": {
                "GET": lambda: _json_answer(200, self.config()),
                "POST": lambda: self._post_config(body),
            },
            "/_sandbox/requests": {"GET": lambda: self._get_requests(query)},
            "/_sandbox/stats": {"GET": lambda: _json_answer(200, self.stats())},
            "/_sandbox/reset": {"POST": lambda: self._post_reset()},
            "/_sandbox/oauth": {
                "GET": lambda: _json_answer(200, self.oauth_stats()),
                "POST": lambda: self._post_oauth(body),
            },
        }
        handlers = routes.get(path)
        if handlers is None:
            return _error_answer(404, f"no such control endpoint: {path}")
        handler = handlers.get(method)
        if handler is None:
            answer = _error_answer(405, f"method {method} is not allowed on {path}")
            answer.headers.append(("allow", ", ".join(handlers)))
            return answer
        try:
            return handler()
        except ValueError as exc:
            return _error_answer(400, str(exc), code="INVALID_REQUEST")

    @staticmethod
    def _json_doc(body: bytes) -> Any:
        try:
            return json.loads(body or b"{}")
        except (ValueError, RecursionError):
            raise ValueError("request body is not valid JSON") from None

    def _post_config(self, body: bytes) -> _Answer:
        doc = self._json_doc(body)
        if not isinstance(doc, dict):
            raise ValueError("config must be an object")
        unknown = sorted(set(doc) - _CONFIG_KEYS)
        if unknown:
            raise ValueError(f"config has unknown keys: {', '.join(unknown)}")
        tokens = doc.get("tokens")
        if tokens is not None and not isinstance(tokens, list):
            raise ValueError("tokens must be a list of strings")
        self.configure(
            latency_ms=doc.get("latencyMs"), latency_p99_ms=doc.get("latencyP99Ms"), tokens=tokens
        )
        return _json_answer(200, self.config())

    def _get_requests(self, query: str) -> _Answer:
        params = parse_qs(query)
        user_id = params.get("userId", [None])[-1]
        template_id = params.get("templateId", [None])[-1]
        return _json_answer(
            200, {"requests": self.requests(user_id=user_id, template_id=template_id)}
        )

    def _post_reset(self) -> _Answer:
        self.reset()
        return _json_answer(200, {"reset": True})

    # -- the OAuth2 token endpoint -------------------------------------------------------------

    def _token_ok(self, token: str | None) -> bool:
        if token is None:
            return False
        if token in self._tokens:
            return True
        expires = self._oauth.access.get(token)
        return expires is not None and expires > time.time()

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
        self._apply_oauth({key: value for key, value in doc.items() if value is not None})

    def _apply_oauth(self, doc: dict[str, Any]) -> None:
        unknown = sorted(set(doc) - _OAUTH_KEYS)
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
        with self._lock:
            if doc.get("reset"):
                self._oauth = _OAuth()
            o = self._oauth
            if failures is not None:
                o.failures = deque(failures)
            if access_ttl is not None:
                o.access_ttl_s = access_ttl
            if refresh_ttl is not None:
                o.refresh_ttl_s = refresh_ttl
            if "geolocation" in doc:
                o.geolocation = geolocation
            if "redirectTo" in doc:
                o.redirect_to = redirect_to
            o.client_secret = texts["clientSecret"] or o.client_secret
            o.company_id = texts["companyId"] or o.company_id
            o.auth_token = texts["authToken"] or o.auth_token
            if doc.get("revokeRefreshTokens"):
                o.retired.update(o.refresh)
                o.refresh.clear()

    def issue_refresh_token(self, client_id: str) -> str:
        """A valid refresh token for ``client_id``, as Concur's tools hand one to an admin."""
        token = f"sbx-rt-{uuid.uuid4().hex}"
        with self._lock:
            o = self._oauth
            o.refresh[token] = (client_id, time.time() + o.refresh_ttl_s)
            o.issued.append(token)
        return token

    def issued_tokens(self) -> list[str]:
        """Every access and refresh token issued (in-process only: never over HTTP)."""
        with self._lock:
            return list(self._oauth.issued)

    def oauth_stats(self) -> dict[str, Any]:
        """The token endpoint's counters and request log (no secret in them)."""
        now = time.time()
        with self._lock:
            o = self._oauth
            return {
                "grants": dict(o.grants),
                "codes": {str(k): v for k, v in sorted(o.codes.items())},
                "byStatus": {str(k): v for k, v in sorted(o.statuses.items())},
                "reusedRefreshTokens": o.reused,
                "failuresLeft": len(o.failures),
                "liveAccessTokens": sum(1 for t in o.access.values() if t > now),
                "liveRefreshTokens": len(o.refresh),
                "accessTtlSeconds": o.access_ttl_s,
                "requests": list(o.log),
            }

    def _post_oauth(self, body: bytes) -> _Answer:
        doc = self._json_doc(body)
        if not isinstance(doc, dict):
            raise ValueError("oauth must be an object")
        self._apply_oauth(doc)
        return _json_answer(200, self.oauth_stats())

    def _token_endpoint(self, method: str, headers: dict[str, str], body: bytes) -> _Answer:
        if method != "POST":
            answer = _json_answer(
                405, {"error": "invalid_request", "error_description": "use POST"}
            )
            answer.headers.append(("allow", "POST"))
            return answer
        content_type = headers.get("content-type", "").partition(";")[0].strip().lower()
        if content_type != _FORM:
            return _json_answer(
                400,
                {"error": "invalid_request", "error_description": f"Content-Type must be {_FORM}"},
            )
        try:
            parsed = parse_qs(body.decode("utf-8"), keep_blank_values=True)
        except UnicodeDecodeError:
            parsed = {}
        form = {key: values[-1] for key, values in parsed.items()}
        with self._lock:
            return self._grant(form, time.time())

    def _grant(self, form: dict[str, str], now: float) -> _Answer:
        o = self._oauth
        grant_type = form.get("grant_type", "")
        client_id = form.get("client_id", "")

        def done(status: int, doc: dict[str, Any]) -> _Answer:
            code = doc.get("code")
            if isinstance(code, int):
                o.codes[code] = o.codes.get(code, 0) + 1
            o.statuses[status] = o.statuses.get(status, 0) + 1
            o.log.append({"at": now, "grantType": grant_type, "status": status, "code": code})
            return _json_answer(status, doc)

        def refused(status: int, error: str, description: str, code: int | None = None) -> _Answer:
            doc: dict[str, Any] = {"error": error, "error_description": description}
            if code is not None:
                doc["code"] = code
            return done(status, doc)

        if o.failures:
            status = o.failures.popleft()
            return refused(status, "server_error", f"scripted {status}")
        if o.redirect_to:
            return done(
                400,
                {
                    "code": 16,
                    "error": "invalid_grant",
                    "error_description": "the principal lives in another geolocation",
                    "geolocation": o.redirect_to,
                },
            )
        if not client_id or form.get("client_secret") != o.client_secret:
            return refused(401, "invalid_client", "unknown client or wrong secret")
        if grant_type == "password":
            if (
                form.get("credtype") != "authtoken"
                or form.get("username") != o.company_id
                or form.get("password") != o.auth_token
            ):
                return refused(400, "invalid_grant", "bad company id or auth token")
        elif grant_type == "refresh_token":
            presented = form.get("refresh_token", "")
            entry = o.refresh.get(presented)
            if entry is None or entry[0] != client_id or entry[1] <= now:
                if presented in o.retired:
                    o.reused += 1
                return refused(400, "invalid_grant", "bad or expired refresh token", 108)
            del o.refresh[presented]
            o.retired.add(presented)
        else:
            return refused(400, "unsupported_grant_type", "use password or refresh_token")
        access = f"sbx-at-{uuid.uuid4().hex}"
        refresh = f"sbx-rt-{uuid.uuid4().hex}"
        o.access[access] = now + o.access_ttl_s
        o.refresh[refresh] = (client_id, now + o.refresh_ttl_s)
        o.issued.extend((access, refresh))
        o.grants[grant_type] = o.grants.get(grant_type, 0) + 1
        return done(
            200,
            {
                "expires_in": f"{o.access_ttl_s:g}",
                "scope": "notifications.messages.writeonly",
                "token_type": "Bearer",
                "access_token": access,
                "refresh_token": refresh,
                "refresh_expires_in": int(now + o.refresh_ttl_s),
                "geolocation": o.geolocation or self.root_url,
                "id_token": "sandbox-id-token",
            },
        )


def main(argv: list[str] | None = None) -> int:
    """Run the sandbox in the foreground until SIGINT/SIGTERM."""
    parser = argparse.ArgumentParser(
        prog="sandbox", description="Local stand-in for the SAP Concur Notifications v4 API."
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8099, help="0 picks a free port")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="median latency")
    parser.add_argument(
        "--latency-p99-ms", type=float, default=None, help="99th percentile: a lognormal tail"
    )
    parser.add_argument(
        "--token",
        action="append",
        dest="tokens",
        metavar="TOKEN",
        help="accepted bearer token; repeatable (default: sandbox-token)",
    )
    parser.add_argument("--base-path", default="/notifications/v4")
    args = parser.parse_args(argv)
    sandbox = Sandbox(
        args.host,
        args.port,
        tokens=args.tokens or ("sandbox-token",),
        latency_ms=args.latency_ms,
        latency_p99_ms=args.latency_p99_ms,
        base_path=args.base_path,
    )
    sandbox._run_foreground(lambda: print(f"sandbox listening on {sandbox.url}", flush=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
