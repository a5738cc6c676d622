"""Reading a request body with a size bound and one deadline, for every endpoint that reads one.

``notify api`` also bounds the body's arrival in its protocol (``worker.front.httpserver``); this
deadline holds when the app is served some other way (``uvicorn worker.front.api:app``) and
turns a client that went away mid-body into a clear answer instead of a server error.
"""

from __future__ import annotations

import asyncio

from starlette.requests import ClientDisconnect, Request


class BodyTooLarge(Exception):
    """More than the limit arrived (or was announced)."""


class BodyTooSlow(Exception):
    """The body did not arrive within its deadline, or the client left before it ended."""


async def read_body(request: Request, *, limit: int, deadline_seconds: float) -> bytes:
    """The whole body, at most ``limit`` bytes, arrived within ``deadline_seconds``.

    A ``Content-Length`` above the limit is refused before reading; the declared length may be
    absent (chunked) or wrong, so what arrives is counted too.
    """
    declared = request.headers.get("content-length")
    if declared is not None and declared.strip().isdigit() and int(declared) > limit:
        raise BodyTooLarge
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(deadline_seconds):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise BodyTooLarge
                chunks.append(chunk)
    except (TimeoutError, ClientDisconnect):
        raise BodyTooSlow from None
    return b"".join(chunks)


__all__ = ["BodyTooLarge", "BodyTooSlow", "read_body"]
