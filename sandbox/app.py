"""The sandbox's ASGI app: the framing rules, the v4 endpoint, and the control plane on Starlette.

Every request first meets the sandbox's framing rules (headers within 16 KiB, a
``Content-Length`` body within 64 KiB, no chunked body: 413, 413, 411); a request refused there is
answered at once and its connection closed, its body unread. A control request's body may be up
to 16 MiB (a thousand companies created in one call). Then:

* ``/_sandbox/...`` and ``/oauth2/v0/token`` go to a Starlette app (routing, Request/Response,
  JSON errors through its exception handlers): the control plane and the token endpoint, a few
  requests per test or benchmark run.
* Everything else is the v4 endpoint, a raw ASGI function: it is the benchmark's hot path
  (thousands of requests a second), where Starlette's Request/Response objects would be
  overhead for no gain, and it answers any path itself (404 and 405 are v4 answers, recorded).

The v4 endpoint asks :meth:`SandboxCore.decide` for the answer, then sleeps its latency
(``asyncio.sleep``: thousands of slow requests cost only timers), or plays its fault through
``sandbox.wire``: *hang* waits for the client to give up, *drop* and *garbled* act on the
connection itself and then wait for it to be gone.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any
from urllib.parse import parse_qs

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from sandbox.companies import parse_geolocation_name
from sandbox.core import NotFound, SandboxCore
from sandbox.v4 import Answer, error_answer, json_answer
from sandbox.wire import connection_geolocation, connection_id, drop, garble

__all__ = ["CONTROL_PREFIX", "TOKEN_PATH", "SandboxApp"]

CONTROL_PREFIX = "/_sandbox"
TOKEN_PATH = "/oauth2/v0/token"
MAX_HEADER_BYTES = 16 * 1024
MAX_BODY_BYTES = 64 * 1024
MAX_CONTROL_BODY_BYTES = 16 * 1024 * 1024
_FORM = "application/x-www-form-urlencoded"


class SandboxApp:
    """The ASGI app uvicorn serves (see the module docstring for the routing)."""

    def __init__(self, core: SandboxCore) -> None:
        self._core = core
        self._control = _control_app(core)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return  # uvicorn runs with lifespan and websockets off
        try:
            await self._route(scope, receive, send)
        except asyncio.CancelledError:
            # Only stop() cancels requests, after closing their connections: nothing is left
            # to answer, and uvicorn would log a cancelled request as an application error.
            return

    async def _route(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw_path = scope["raw_path"].decode("latin-1")
        control = raw_path == CONTROL_PREFIX or raw_path.startswith(CONTROL_PREFIX + "/")
        authorization, content_type, refusal = _read_head(
            scope["headers"], len(raw_path), MAX_CONTROL_BODY_BYTES if control else MAX_BODY_BYTES
        )
        if refusal is not None:
            if not control:
                refusal = self._core.refuse(
                    connection_id(scope),
                    scope["method"],
                    raw_path,
                    authorization,
                    refusal,
                    connection_geolocation(scope),
                )
            # The body was not read: the connection cannot carry another request.
            refusal.headers.append(("connection", "close"))
            await _send(send, refusal)
        elif control or raw_path == TOKEN_PATH:
            if control and len(raw_path) > 1 and raw_path.endswith("/"):
                scope = {**scope, "path": scope["path"].rstrip("/")}  # /_sandbox/stats/ too
            await self._control(scope, receive, send)
        else:
            await self._v4(scope, receive, send, raw_path, authorization, content_type)

    async def _v4(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        raw_path: str,
        authorization: str | None,
        content_type: str | None,
    ) -> None:
        body = await _read_body(receive)
        if body is None:
            return  # the client went away mid-request; nothing left to answer
        answer = self._core.decide(
            connection_id(scope),
            scope["method"],
            raw_path,
            authorization,
            content_type,
            body,
            connection_geolocation(scope),
        )
        if answer.fault is not None:
            if answer.fault == "drop":
                drop(scope)
            elif answer.fault == "garbled":
                garble(scope)
            await _disconnected(receive)  # a hang lasts until the client gives up
            return
        if answer.delay > 0:
            await asyncio.sleep(answer.delay)
        await _send(send, answer)


def _read_head(
    headers: list[tuple[bytes, bytes]], path_size: int, max_body: int
) -> tuple[str | None, str | None, Answer | None]:
    """Authorization and Content-Type, and the framing refusal if the request gets one."""
    found: dict[bytes, str] = {}
    size = path_size
    for name, value in headers:
        size += len(name) + len(value) + 4
        text = value.decode("latin-1")
        # Repeated headers read as one, comma-joined, as HTTP defines them.
        found[name] = f"{found[name]}, {text}" if name in found else text
    refusal: Answer | None = None
    length = found.get(b"content-length", "0")
    if size > MAX_HEADER_BYTES:
        refusal = error_answer(413, "request headers exceed 16 KiB")
    elif b"transfer-encoding" in found:
        refusal = error_answer(411, "chunked request bodies are not supported; send Content-Length")
    elif not length.isdigit():
        refusal = error_answer(400, "invalid Content-Length")
    elif int(length) > max_body:
        refusal = error_answer(413, f"request body exceeds {max_body // 1024} KiB")
    return found.get(b"authorization"), found.get(b"content-type"), refusal


async def _read_body(receive: Receive) -> bytes | None:
    """The whole request body (bounded by the framing rules); None if the client went away."""
    body = b""
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None
        body += message.get("body", b"")
        if not message.get("more_body", False):
            return bytes(body)


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _send(send: Send, answer: Answer) -> None:
    await send({"type": "http.response.start", "status": answer.status, "headers": answer.head()})
    await send({"type": "http.response.body", "body": answer.body})


# -- the control plane and the token endpoint (Starlette) -------------------------------------


def _response(answer: Answer) -> Response:
    headers = {"concur-correlationid": answer.correlation_id, **dict(answer.headers)}
    return Response(answer.body, answer.status, headers, answer.content_type)


def _json(status: int, doc: Any) -> Response:
    return _response(json_answer(status, doc))


async def _doc(request: Request) -> Any:
    try:
        return json.loads(await request.body() or b"{}")
    except (ValueError, RecursionError):
        raise ValueError("request body is not valid JSON") from None


def _param(request: Request, name: str) -> str | None:
    """A query parameter (its last value), or None."""
    return parse_qs(request.url.query).get(name, [None])[-1]


async def _unknown(request: Request, exc: Exception) -> Response:
    """An unknown company or geolocation named in a control request: 404."""
    return _response(error_answer(404, str(exc.args[0] if exc.args else exc)))


async def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's 404 and 405 as the sandbox words them (JSON, with the Allow header kept)."""
    assert isinstance(exc, HTTPException)
    path = request.url.path
    if path == TOKEN_PATH:
        answer = json_answer(
            exc.status_code, {"error": "invalid_request", "error_description": "use POST"}
        )
    elif exc.status_code == 405:
        answer = error_answer(405, f"method {request.method} is not allowed on {path}")
    else:
        answer = error_answer(exc.status_code, f"no such control endpoint: {path}")
    answer.headers.extend((name.lower(), value) for name, value in (exc.headers or {}).items())
    return _response(answer)


async def _invalid(request: Request, exc: Exception) -> Response:
    """A control document the sandbox refuses: 400 with the parser's message."""
    return _response(error_answer(400, str(exc), code="INVALID_REQUEST"))


def _control_app(core: SandboxCore) -> Starlette:
    async def scripts(request: Request) -> Response:
        if request.method == "POST":
            return _json(201, core.install_script(await _doc(request)))
        return _json(200, {"cleared": core.clear_scripts()})

    async def config(request: Request) -> Response:
        if request.method == "POST":
            return _json(200, core.configure_from(await _doc(request)))
        return _json(200, core.config())

    async def requests(request: Request) -> Response:
        found = core.requests(
            user_id=_param(request, "userId"),
            template_id=_param(request, "templateId"),
            company=_param(request, "company"),
            geolocation=_param(request, "geolocation"),
        )
        return _json(200, {"requests": found})

    async def stats(request: Request) -> Response:
        company, geolocation = _param(request, "company"), _param(request, "geolocation")
        return _json(200, core.stats(company=company, geolocation=geolocation))

    async def geolocations(request: Request) -> Response:
        if request.method == "POST":
            doc = await _doc(request)
            if not isinstance(doc, dict) or set(doc) - {"name", "port"}:
                raise ValueError('a geolocation is {"name": ..., "port": 0}')
            name, port = parse_geolocation_name(doc.get("name")), doc.get("port", 0)
            known = name in core.geolocation_names()
            # Listening waits on this server's own loop: off the loop, in a thread.
            added = await run_in_threadpool(core.add_geolocation, name, port)
            return _json(200 if known else 201, added)
        return _json(200, {"geolocations": [core.geolocation(n) for n in core.geolocation_names()]})

    async def geolocation(request: Request) -> Response:
        name = request.path_params["name"]
        if request.method == "POST":
            return _json(200, core.install_geolocation_script(name, await _doc(request)))
        return _json(200, core.geolocation(name))

    async def companies(request: Request) -> Response:
        if request.method == "POST":
            return _json(201, {"created": core.create_companies(await _doc(request))})
        if request.method == "DELETE":
            return _json(200, {"cleared": core.clear_companies()})
        return _json(200, core.companies())

    async def company(request: Request) -> Response:
        company_id = request.path_params["company_id"]
        if request.method == "POST":
            return _json(200, core.update_company_from(company_id, await _doc(request)))
        if request.method == "DELETE":
            core.remove_company(company_id)
            return _json(200, {"removed": company_id})
        return _json(200, core.company(company_id))

    async def reset(request: Request) -> Response:
        core.reset()
        return _json(200, {"reset": True})

    async def oauth(request: Request) -> Response:
        if request.method == "POST":
            return _json(200, core.configure_oauth_from(await _doc(request)))
        return _json(200, core.oauth_stats())

    async def token(request: Request) -> Response:
        content_type = request.headers.get("content-type", "").partition(";")[0].strip().lower()
        if content_type != _FORM:
            description = f"Content-Type must be {_FORM}"
            return _json(400, {"error": "invalid_request", "error_description": description})
        try:
            parsed = parse_qs((await request.body()).decode("utf-8"), keep_blank_values=True)
        except UnicodeDecodeError:
            parsed = {}
        status, doc = core.token_request(
            {key: values[-1] for key, values in parsed.items()},
            connection_geolocation(request.scope),
        )
        return _json(status, doc)

    return Starlette(
        routes=[
            Route(f"{CONTROL_PREFIX}/scripts", scripts, methods=["POST", "DELETE"]),
            Route(f"{CONTROL_PREFIX}/config", config, methods=["GET", "POST"]),
            Route(f"{CONTROL_PREFIX}/requests", requests, methods=["GET"]),
            Route(f"{CONTROL_PREFIX}/stats", stats, methods=["GET"]),
            Route(f"{CONTROL_PREFIX}/reset", reset, methods=["POST"]),
            Route(f"{CONTROL_PREFIX}/oauth", oauth, methods=["GET", "POST"]),
            Route(f"{CONTROL_PREFIX}/geolocations", geolocations, methods=["GET", "POST"]),
            Route(f"{CONTROL_PREFIX}/geolocations/{{name}}", geolocation, methods=["GET", "POST"]),
            Route(f"{CONTROL_PREFIX}/companies", companies, methods=["GET", "POST", "DELETE"]),
            Route(
                f"{CONTROL_PREFIX}/companies/{{company_id}}",
                company,
                methods=["GET", "POST", "DELETE"],
            ),
            Route(TOKEN_PATH, token, methods=["POST"]),
        ],
        exception_handlers={HTTPException: _http_error, ValueError: _invalid, NotFound: _unknown},
    )
