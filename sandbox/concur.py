"""Local stand-in for the SAP Concur Notifications v4 API.

The sandbox speaks the one endpoint the worker calls::

    POST {base_path}/messages/{userId}/session        base_path defaults to /notifications/v4
    Authorization: Bearer <token>
    Content-Type: application/json
    {"sessionId": "...", "templateId": "...", "context": {"url": "..."}}

It answers 200 with an empty body, or the seed's ErrorMessage
``{"errors": [{"errorId", "errorCode", "errorMessage"}]}`` for 400/401/404/405/411/413/415, and
every response carries a fresh ``concur-correlationid``. Requests are validated (path, method,
token, content type, body schema) *before* any script is consulted, so an invalid request is
always answered 4xx.

It is used by the tests (in a background thread, :meth:`Sandbox.start`), by the local dev stack
and by the throughput benchmark (in the foreground via :func:`main`, thousands of requests a
second with thousands of slow ones in flight).

Design: a Starlette app served by uvicorn (httptools, uvloop), in four layers:

* ``sandbox.plans``, ``sandbox.v4``, ``sandbox.oauth``, ``sandbox.companies``,
  ``sandbox.ledger``: pure parts, no I/O: scripts, the v4 contract, the token endpoint, the
  companies and their tokens, the record and counters.
* ``sandbox.core``: :class:`~sandbox.core.SandboxCore`, their state under one lock, what each
  request is answered, and the in-process control API.
* ``sandbox.app``: the ASGI app: the control plane and the token endpoint on Starlette, the hot
  v4 endpoint as a raw ASGI function. Latency is an ``asyncio.sleep``, so thousands of slow
  requests in flight cost only timers.
* ``sandbox.wire``: the thin layer over the socket, a small subclass of uvicorn's httptools
  protocol. It exists because two faults have no ASGI form (closing a connection unanswered,
  answering bytes that are not HTTP); it also counts connections, tells each request which
  geolocation's port it came to, and makes ``stop()`` drop what is in flight at once.

This module adds serving (:class:`Sandbox`: start, stop, serve_forever) and the command line.

Scripts plan what the API answers. Each script matches one userId, one templateId or everything
(precedence: userId, templateId, default, plain 200). Its ``responses`` are consumed one per
matching request; afterwards ``then`` (default ``{"status": 200}``) answers. ``rate`` replaces
``responses`` with random flapping. A planned response is
``{"status", "retryAfter", "delayMs", "errors", "body", "contentType", "hang", "drop",
"garbled"}``, all optional except ``status``. ``hang`` holds the request until the client gives
up; ``drop`` reads it and closes the connection without a word, as a crashed server or a
resetting proxy does; ``garbled`` answers bytes that are not HTTP and closes. Posting a script
for a match that already has one replaces it.

Control endpoints (JSON, no auth, at the root of every geolocation, never delayed; a body may be
up to 16 MiB):

* ``POST /_sandbox/scripts`` one script ``{"match", "responses" | "rate", "then"}`` -> 201
* ``DELETE /_sandbox/scripts`` clears all scripts -> 200
* ``GET|POST /_sandbox/config`` ``{"latencyMs": 20, "latencyP99Ms": 200, "tokens": ["t1"]}``
  -> 200 current config (tokens are reported as ``tokenSha256`` prefixes, never echoed)
* ``GET /_sandbox/requests[?userId=..&templateId=..&company=..&geolocation=..]`` ->
  ``{"requests": [...]}``; each record says which ``company`` 's token the post carried (its
  UUID; null for the default company's tokens, an unknown token or none) and which
  ``geolocation`` received it. ``company=default`` selects the records with null.
* ``GET /_sandbox/stats[?company=..&geolocation=..]`` -> ``{"total", "byStatus", "delivered",
  "firstDeliveredAt", "lastDeliveredAt", "perSecond", "maxPerSecond", "hung", "dropped",
  "garbled", "connections", "openConnections"}``, over one company's (a UUID or ``default``)
  and/or one geolocation's posts when asked (then ``connections`` are the geolocation's; with a
  company UUID, ``tokenRequests``: its token requests since it was created)
* ``POST /_sandbox/reset`` clears scripts (the geolocations' too), records and stats; config,
  geolocations and companies stay -> 200
* ``GET|POST /_sandbox/oauth`` ``{"failures": [503, 503], "accessTtlSeconds": 2,
  "refreshTtlSeconds", "geolocation", "redirectTo", "clientSecret", "companyId", "authToken",
  "revokeRefreshTokens": true, "reset": true}`` -> 200 the token endpoint's counters (every
  company's token requests included; ``reset`` leaves the companies alone)

Geolocations (``Sandbox(geolocations=["us", "emea"])``, default ``["us"]``; ``notify sandbox
--geolocation us --geolocation emea=8100``): each listens on a loopback port of its own, all
sharing one state and one ledger. The first is the primary (``root_url``, ``url``, ``--port``).

* ``GET /_sandbox/geolocations`` -> ``{"geolocations": [{"name", "primary", "rootUrl", "url",
  "answer", "delayMs"}]}``; ``rootUrl`` is what token answers carry as ``geolocation``
  (``Sandbox.geolocations()``: name -> root URL)
* ``POST /_sandbox/geolocations`` ``{"name": "apj", "port": 0}`` -> 201 the new geolocation,
  listening at once (200 when it exists); ``Sandbox.add_geolocation``
* ``GET|POST /_sandbox/geolocations/{name}`` ``{"answer": {planned response} | null,
  "delayMs": 500}`` -> 200 (404 unknown): ``answer`` is given to every valid post there (an
  outage: ``{"status": 503}``; the user, template and default scripts are not consulted, so not
  used up; token requests there are answered as usual), ``delayMs`` is added to every answer
  there (a slow data center); posting replaces both, ``{}`` clears them, as do ``DELETE
  /_sandbox/scripts`` and reset. ``Sandbox.script_geolocation``

Companies (``sandbox.companies``): each is a Concur company UUID (canonical lowercase) living at
one geolocation, with the request token its password grant takes. Its token requests go to
``POST {rootUrl}/oauth2/v0/token`` as Concur's do: ``grant_type=password``,
``username=<companyId>``, ``password=<requestToken>``, ``credtype=authtoken``, with the app's
client id and secret (the same ``clientSecret`` as the default company's), then
``grant_type=refresh_token``; answers carry its own rotating tokens and its geolocation's
``rootUrl``. A company's token request at another geolocation is answered 400 code 16 naming
its own (as ``redirectTo`` does) and spends nothing; its access token is good at its own
geolocation only (elsewhere: 401). The default company (static tokens, ``companyId`` /
``authToken``) is served at every geolocation, as before. Each post's token check is a dict
lookup, however many companies there are.

* ``POST /_sandbox/companies`` one ``{"id", "geolocation", "requestToken", "refreshToken"?,
  "clientId"?}`` or ``{"companies": [...]}`` (a thousand in one call) -> 201 ``{"created": n}``;
  all or none (400 naming the first bad one); an id that exists is replaced, its tokens
  forgotten. ``refreshToken``: one it already holds (bound to ``clientId``, else to the first
  client presenting it). ``Sandbox.create_company``, ``Sandbox.create_companies``
* ``GET /_sandbox/companies`` -> ``{"count", "tokenRequestsPerCompany": {"1": 1000},
  "companies": [{"id", "geolocation", "rootUrl", "createdAt", "tokenRequests", "grants",
  "codes", "liveAccessTokens", "liveRefreshTokens", "posts", "delivered"}]}`` (no secret);
  ``tokenRequestsPerCompany`` counts companies by their number of token requests
* ``GET /_sandbox/companies/{id}`` -> 200 one company (404 unknown)
* ``POST /_sandbox/companies/{id}`` ``{"revokeRefreshTokens": true, "revokeAccessTokens": true,
  "geolocation": "us", "requestToken": "..."}`` -> 200 the company: revoked refresh tokens are
  answered code 108 (its request token still connects it again), revoked access tokens 401; a
  moved company's token requests elsewhere get code 16. ``Sandbox.update_company``
* ``DELETE /_sandbox/companies/{id}`` -> 200 (its tokens stop working); ``DELETE
  /_sandbox/companies`` -> ``{"cleared": n}``

The token endpoint ``POST /oauth2/v0/token`` (form-encoded, at the server root) plays Concur's
OAuth2 (``sandbox.oauth`` has the rules): the password and refresh_token grants, rotating refresh
tokens, scripted failures and geolocation redirects. Its access tokens are accepted by the v4
endpoint besides the configured static tokens; ``geolocation`` defaults to the sandbox's own root
URL. Token requests are counted apart from the v4 requests (``GET /_sandbox/oauth``), never
echoing a secret.

A request is recorded (and counted) when its answer is decided, before any latency: a 200 that
the client gave up waiting for still counts as delivered, as it would on the real API. A hung
request is recorded with ``"status": null`` and counted in ``hung``, not ``byStatus``; so is a
dropped one, counted in ``dropped``, and a garbled one, in ``garbled``.

Example::

    with Sandbox(latency_ms=20) as sandbox:
        sandbox.script([{"status": 503, "retryAfter": "2"}], template_id="welcome")
        r = httpx.post(f"{sandbox.url}/messages/u1/session",
                       headers={"Authorization": "Bearer sandbox-token"},
                       json={"sessionId": "s1", "templateId": "welcome", "context": {}})
        assert r.status_code == 503  # the next "welcome" request gets 200
        assert sandbox.stats()["byStatus"] == {"503": 1}

Many companies::

    with Sandbox(geolocations=["us", "emea"]) as sandbox:
        sandbox.create_company(ACME_UUID, geolocation="emea", request_token="rq-acme")
        sandbox.script_geolocation("emea", answer={"status": 503})  # an EMEA outage
        ...
        sandbox.update_company(ACME_UUID, revoke_refresh_tokens=True)
        assert sandbox.companies()["tokenRequestsPerCompany"] == {"1": 1}
        sandbox.requests(company=ACME_UUID, geolocation="emea")

From a shell: ``python -m sandbox.concur --port 8099 --latency-ms 20 --token dev-token``.
"""

from __future__ import annotations

import argparse
import contextlib
import socket
import threading
from collections.abc import Callable, Iterable

from sandbox.app import SandboxApp
from sandbox.core import DEFAULT_GEOLOCATION, SandboxCore
from sandbox.wire import Serving, listen, port_of

__all__ = ["Sandbox", "main"]


class Sandbox(SandboxCore):
    """The fake Notifications v4 API, served. Methods are safe to call from any thread."""

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
        """``port`` is the primary geolocation's (the first of ``geolocations``); the others
        listen on free ports (see :meth:`add_geolocation` for one on a port of its own)."""
        super().__init__(
            host,
            port,
            tokens=tokens,
            latency_ms=latency_ms,
            latency_p99_ms=latency_p99_ms,
            base_path=base_path,
            max_records=max_records,
            geolocations=geolocations,
        )
        self._app = SandboxApp(self)
        self._lifecycle = threading.Lock()
        self._thread: threading.Thread | None = None
        self._serving: Serving | None = None
        # Guards handing sockets to the running server: a geolocation added while the
        # sandbox starts or stops is served by that run or bound by the next start.
        self._geo_lock = threading.Lock()

    def __enter__(self) -> Sandbox:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> str:
        """Serve from a daemon thread; return the base URL once the socket is served."""
        with self._lifecycle:
            if self._thread is not None:
                return self.url
            if self._serving is not None:
                raise RuntimeError("sandbox is already serving in the foreground")
            try:
                serving = self._new_serving()
            except OSError as exc:
                raise RuntimeError("sandbox failed to start") from exc
            ready = threading.Event()
            failures: list[BaseException] = []
            thread = threading.Thread(
                target=_serve_in_thread,
                args=(serving, ready, failures),
                name="concur-sandbox",
                daemon=True,
            )
            thread.start()
            ready.wait()
            if failures or not serving.started:
                thread.join()
                with self._geo_lock:
                    self._serving = None
                raise RuntimeError("sandbox failed to start") from (
                    failures[0] if failures else None
                )
            self._thread = thread
        return self.url

    def stop(self) -> None:
        """Stop serving (dropping hung and delayed requests) and join the thread; idempotent."""
        with self._lifecycle:
            if self._serving is not None:
                self._serving.stop()
            if self._thread is not None:
                self._thread.join()
                self._thread = None
                with self._geo_lock:
                    self._serving = None

    def serve_forever(self) -> None:
        """Serve in the calling thread until SIGINT/SIGTERM or :meth:`stop`."""
        self._run_foreground(None)

    def _run_foreground(self, on_ready: Callable[[], None] | None) -> None:
        with self._lifecycle:
            if self._thread is not None:
                raise RuntimeError("sandbox is already serving in a background thread")
            serving = self._new_serving()
        try:
            with contextlib.suppress(KeyboardInterrupt):
                serving.run(on_ready or _nothing, install_signals=True)
        finally:
            with self._lifecycle, self._geo_lock:
                self._serving = None

    def _new_serving(self) -> Serving:
        """Bind every geolocation's port (closing them all if one is taken) and make the run
        that serves them; it is the one new geolocations are handed to from now on."""
        with self._geo_lock:
            sockets: list[socket.socket] = []
            try:
                for name, port in self._ports_wanted().items():
                    sockets.append(listen(self._host, port))
                    self._listening(name, port_of(sockets[-1]))
                serving = Serving(self._app, self, sockets)
            except BaseException:
                for sock in sockets:
                    sock.close()
                raise
            self._serving = serving
            return serving

    def _serve_geolocation(self, name: str, port: int) -> None:
        with self._geo_lock:
            serving = self._serving
            if serving is None:
                return  # bound by the next start
            try:
                sock = listen(self._host, port)
            except OSError as exc:
                raise RuntimeError(f"geolocation {name!r} cannot listen on port {port}") from exc
            self._listening(name, port_of(sock))  # before a connection can arrive
            try:
                serving.add(sock)
            except BaseException:
                sock.close()
                raise


def _nothing() -> None:
    pass


def _serve_in_thread(
    serving: Serving, ready: threading.Event, failures: list[BaseException]
) -> None:
    try:
        serving.run(ready.set, install_signals=False)
    except BaseException as exc:  # uvicorn exits (SystemExit) when it cannot serve
        failures.append(exc)
    finally:
        ready.set()


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
    parser.add_argument(
        "--max-records",
        type=int,
        default=200_000,
        help="requests kept for /_sandbox/requests (the counters cover all of them)",
    )
    parser.add_argument(
        "--geolocation",
        action="append",
        dest="geolocations",
        metavar="NAME[=PORT]",
        help=(
            f"a geolocation, on a port of its own; repeatable (default: {DEFAULT_GEOLOCATION});"
            " the first listens on --port, the others on PORT or a free one"
        ),
    )
    args = parser.parse_args(argv)
    wanted: dict[str, int] = {}
    for item in args.geolocations or [DEFAULT_GEOLOCATION]:
        name, _, port = item.partition("=")
        if port and not port.isdigit():
            parser.error(f"--geolocation {item}: PORT must be a number")
        wanted[name] = int(port or 0)
    names = list(wanted)
    try:
        sandbox = Sandbox(
            args.host,
            args.port,
            tokens=args.tokens or ("sandbox-token",),
            latency_ms=args.latency_ms,
            latency_p99_ms=args.latency_p99_ms,
            base_path=args.base_path,
            max_records=args.max_records,
            geolocations=names[:1],
        )
        for name in names[1:]:
            sandbox.add_geolocation(name, wanted[name])
    except ValueError as exc:
        parser.error(str(exc))

    def ready() -> None:
        print(f"sandbox listening on {sandbox.url}", flush=True)
        for name, root in list(sandbox.geolocations().items())[1:]:
            print(f"sandbox geolocation {name} at {root}{sandbox.base_path}", flush=True)

    sandbox._run_foreground(ready)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
