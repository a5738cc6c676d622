"""The dead-letter console: ``/console`` in the HTTP service, for operators in a browser.

A table of dead letters with filters (reason, template, partner, time range) and paging, a
summary on top (deliveries per minute, retry backlog, dead letters by reason, the circuit
breaker), a detail view with every attempt and Concur's ``errors[]``, and replay / delete behind
a confirmation page. Server-rendered HTML (Jinja2 through Starlette's templates, inline CSS, no
script), mounted by ``worker.front.api.create_app``.

Security:

* Login takes an operator key (``NOTIFY_OPERATOR_KEYS``) in a form; the key is never stored, not
  even in the cookie. Sessions are kept in Redis (``worker.front.sessions``): the cookie
  (``HttpOnly``, ``SameSite=Strict``, ``Path=/console``, ``Secure`` over https) holds only a
  session id signed by itsdangerous, with a key derived from the operator keys, so every
  ``notify api`` process accepts the same sessions, and changing the keys ends every session.
  Logging out deletes the session; one unused for ``NOTIFY_CONSOLE_IDLE_SECONDS`` is over, and
  none outlives ``sessions.LIFETIME_SECONDS``.
* Every POST (login included: the cookie carries a token from the login page on) must carry the
  session's CSRF token in its form; a wrong or missing token is a 403 (compared as bytes, so any
  text is just wrong). Logging in starts a new session with a new token (no fixation).
* Wrong keys count toward the failure limits (``worker.front.guard``), per client address and
  over all; past them a login answers 429 without looking at the key.
* Pages are ``Cache-Control: no-store`` with a strict Content-Security-Policy (no script at all,
  forms only to this origin, no framing).
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import json
import logging
import math
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.templating import Jinja2Templates

from worker.concur.companies import listing
from worker.front.bodies import BodyTooLarge, BodyTooSlow, read_body
from worker.front.guard import FailureLimiter, client_address
from worker.front.sessions import LIFETIME_SECONDS, Session, SessionPolicy, Sessions
from worker.front.stats import Stats, collect
from worker.rules import outcomes
from worker.rules.validation import company_problem
from worker.runtime import Runtime
from worker.settings import Settings
from worker.shapes.contract import MAX_CURSOR_LENGTH
from worker.shapes.models import company_of, is_message_id, is_partner_name, partner_of
from worker.shapes.times import iso_utc
from worker.store.codec import DeadLetter, StatusRecord
from worker.store.companies import CompanyRegistry, count_states
from worker.store.query import DeadLetterFilter, decode_cursor, encode_cursor, read_filter

log = logging.getLogger(__name__)

PREFIX = "/console"
COOKIE = "notify_console"
MAX_FORM_BYTES = 16 * 1024
PAGE_SIZES = (25, 50, 100)
DEFAULT_PAGE_SIZE = 25
SUMMARY_MINUTES = 15
# A refused login answers this much later: guessing keys by the thousand gets slow.
LOGIN_FAILURE_DELAY_SECONDS = 0.5
# Message states still moving: their page reloads itself until the state is final.
MOVING_STATES = frozenset({"queued", "inflight", "retrying"})

TEMPLATES = Jinja2Templates(directory=str(Path(__file__).parent / "templates" / "console"))

_HEADERS = {
    "Cache-Control": "no-store",
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}


# -- pure helpers --------------------------------------------------------------------------------


def format_ms(value: Any) -> str:
    """Epoch milliseconds as ``YYYY-MM-DD HH:MM:SS UTC``; ``-`` when absent."""
    shown = iso_utc(value)
    return "-" if shown is None else shown.replace("T", " ").replace("Z", " UTC")


@dataclass(frozen=True, slots=True)
class Query:
    """The table's filters and page, as read from the query string (values as typed)."""

    reason: str = ""
    template: str = ""
    partner: str = ""
    since: str = ""
    until: str = ""
    company: str = ""
    cursor: str = ""  # opaque (worker.store.query.encode_cursor); empty: the first page
    limit: int = DEFAULT_PAGE_SIZE

    def params(self, **changes: Any) -> str:
        """The query string of these filters (empty values left out), with ``changes``."""
        values = {
            "reason": self.reason,
            "template": self.template,
            "partner": self.partner,
            "company": self.company,
            "since": self.since,
            "until": self.until,
            "cursor": self.cursor,
            "limit": str(self.limit) if self.limit != DEFAULT_PAGE_SIZE else "",
        }
        values.update({key: str(value) for key, value in changes.items()})
        return urlencode({key: value for key, value in values.items() if value not in ("", "0")})

    @property
    def filtered(self) -> bool:
        """Whether any filter is set."""
        return any((self.reason, self.template, self.partner, self.company, self.since, self.until))


def read_query(params: Any) -> tuple[Query, DeadLetterFilter, list[str]]:
    """The query, the store filter it means, and a message per value that could not be used."""
    problems: list[str] = []

    def text(name: str, limit: int = 200) -> str:
        return str(params.get(name) or "").strip()[:limit]

    reason = text("reason")
    if reason and reason not in outcomes.REASONS:
        problems.append(f"unknown reason {reason!r}")
        reason = ""
    partner = text("partner")
    if partner and not is_partner_name(partner):
        problems.append(f"{partner!r} is not a partner name")
        partner = ""
    company = text("company")
    refused_company = company_problem(company or None)
    if refused_company is not None:
        problems.append(f"{company!r} is not a company (its UUID in lower case, or 'default')")
        company = ""
    moments = {name: text(name, 40) for name in ("since", "until")}
    # A ``datetime-local`` input is typed to the minute: ``until`` 12:05 is up to 12:05:59.999.
    selection, refused = read_filter(
        reason=reason,
        template=text("template"),
        partner=partner,
        since=moments["since"] or None,
        until=moments["until"] or None,
        company=company,
    )
    for name in refused:
        problems.append(f"{name} is not a date and time")
        moments[name] = ""
    cursor = text("cursor", MAX_CURSOR_LENGTH + 1)
    if cursor and decode_cursor(cursor) is None:
        problems.append("the page cursor is not one this console gave: showing the first page")
        cursor = ""
    limit_raw = text("limit", 4)
    limit = int(limit_raw) if limit_raw.isdigit() and int(limit_raw) in PAGE_SIZES else 0
    query = Query(
        reason=reason,
        template=text("template"),
        partner=partner,
        since=moments["since"],
        until=moments["until"],
        company=company,
        cursor=cursor,
        limit=limit or DEFAULT_PAGE_SIZE,
    )
    return query, selection, problems


def safe_next(value: str | None) -> str:
    """Where to go after logging in: a console path only (never another site)."""
    if (
        value
        and value.startswith(PREFIX)
        and (len(value) == len(PREFIX) or value[len(PREFIX)] in "/?")
        and "\\" not in value
        and value.isprintable()
    ):
        return value
    return PREFIX


# -- operator keys -------------------------------------------------------------------------------


class OperatorKeys:
    """The operator keys: which one a login presents, and the console's cookie secret."""

    def __init__(self, operator_keys: tuple[bytes, ...]) -> None:
        self.operator_keys = operator_keys
        if operator_keys:
            material = b"\0".join(sorted(operator_keys))
            self.secret = hmac.new(material, b"notify console session v1", "sha256").digest()
        else:  # nobody can log in; the login page still needs a token
            self.secret = secrets.token_bytes(32)

    def fingerprint(self, key: bytes) -> str:
        """A short name for an operator key, for logs (the key itself is never kept)."""
        return hmac.new(self.secret, b"operator:" + key, "sha256").hexdigest()[:12]

    def operator_of(self, key: bytes) -> str | None:
        """The fingerprint of ``key`` when it is an operator key; every key is compared."""
        matched = False
        for candidate in self.operator_keys:
            matched |= hmac.compare_digest(key, candidate)
        return self.fingerprint(key) if matched and key else None


def csrf_matches(session: Session | None, given: str) -> bool:
    """Whether a form's CSRF token is the session's; any text (non-ASCII included) is just
    wrong, never an error (``hmac.compare_digest`` takes ASCII ``str`` only, so bytes)."""
    if session is None or not given:
        return False
    expected = session.csrf.encode("utf-8")
    return hmac.compare_digest(given.encode("utf-8", "surrogateescape"), expected)


# -- the pages -----------------------------------------------------------------------------------


class Unauthenticated(Exception):
    """No valid session."""


class CsrfRefused(Exception):
    """A POST without the session's CSRF token."""


class FormTooSlow(Exception):
    """A form's body did not arrive in time (or the client left)."""


class TooManyFailures(Exception):
    """Too many wrong keys from this address (or from everyone) lately."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(retry_after)
        self.retry_after = retry_after


class Console:
    """The console's endpoints over one runtime."""

    def __init__(self, settings: Settings, runtime: Runtime, limiter: FailureLimiter) -> None:
        self.runtime = runtime
        self.keys = OperatorKeys(
            tuple(k.get_secret_value().encode() for k in settings.operator_keys)
        )
        self.sessions = Sessions(
            runtime.redis,
            self.keys.secret,
            SessionPolicy(idle_seconds=settings.console_idle_seconds),
        )
        self.limiter = limiter
        self.body_timeout_seconds = settings.service_body_timeout_seconds
        self.public_url = settings.service_public_url or ""

    # helpers

    def _secure(self, request: Request) -> bool:
        return request.url.scheme == "https" or self.public_url.startswith("https://")

    def _set_session(self, request: Request, response: Response, session: Session) -> None:
        response.set_cookie(
            COOKIE,
            self.sessions.cookie(session),
            max_age=LIFETIME_SECONDS,
            path=PREFIX,
            secure=self._secure(request),
            httponly=True,
            samesite="strict",
        )

    async def _session(self, request: Request) -> Session | None:
        return await run_in_threadpool(self.sessions.read, request.cookies.get(COOKIE))

    async def _operator(self, request: Request) -> Session:
        session = await self._session(request)
        if session is None or not session.logged_in:
            raise Unauthenticated
        return session

    async def _form(self, request: Request) -> dict[str, str]:
        # application/x-www-form-urlencoded, parsed here (no multipart parser needed). Too
        # large or not decodable: no fields (so no CSRF token: 403).
        try:
            body = await read_body(
                request, limit=MAX_FORM_BYTES, deadline_seconds=self.body_timeout_seconds
            )
        except BodyTooLarge:
            return {}
        except BodyTooSlow:
            raise FormTooSlow from None
        try:
            fields = parse_qs(body.decode("utf-8"), max_num_fields=20)
        except (UnicodeDecodeError, ValueError):
            return {}
        return {name: values[0] for name, values in fields.items()}

    @staticmethod
    def _check_csrf(session: Session | None, form: dict[str, str]) -> None:
        if not csrf_matches(session, form.get("csrf", "")):
            raise CsrfRefused

    def _page(
        self,
        request: Request,
        name: str,
        context: dict[str, Any],
        status: int = 200,
        session: Session | None = None,
    ) -> Response:
        context = {
            "prefix": PREFIX,
            "session": session,
            "csrf": session.csrf if session is not None else None,
            **context,
        }
        response = TEMPLATES.TemplateResponse(request, name, context, status_code=status)
        response.headers.update(_HEADERS)
        return response

    @staticmethod
    def _id(request: Request) -> str | None:
        value = str(request.path_params["id"])
        return value if is_message_id(value) else None

    def _summary(self, stats: Stats) -> dict[str, Any]:
        minutes = list(stats.delivered_per_minute)
        peak = max((m.delivered for m in minutes), default=0) or 1
        return {
            "stats": stats,
            "delivered_last_minute": stats.delivered_last_minute,
            "minutes": [
                {
                    "at": format_ms(m.minute_start_ms)[11:16],
                    "count": m.delivered,
                    "height": max(2, round(100 * m.delivered / peak)) if m.delivered else 0,
                }
                for m in minutes
            ],
            "backlog": stats.retry_waiting,
            "reasons": sorted(
                ((reason, count) for reason, count in stats.dead_letters.items() if count),
                key=lambda item: (-item[1], item[0]),
            ),
            "partners": sorted(stats.partners),
            "companies": ["default", *sorted(set(stats.waiting_by_company) - {"default"})],
        }

    # endpoints

    async def index(self, request: Request) -> Response:
        """``GET /console``: the summary and a page of dead letters."""
        session = await self._operator(request)
        query, selection, problems = read_query(request.query_params)
        store = self.runtime.deadletters
        stats = await run_in_threadpool(
            functools.partial(collect, self.runtime, minutes=SUMMARY_MINUTES)
        )
        page = await run_in_threadpool(
            functools.partial(
                store.page, selection, after=decode_cursor(query.cursor), limit=query.limit
            )
        )
        return self._page(
            request,
            "index.html",
            {
                **self._summary(stats),
                "query": query,
                "problems": problems,
                "letters": page.items,
                "next_cursor": (
                    None if page.next_cursor is None else encode_cursor(page.next_cursor)
                ),
                "reason_names": outcomes.REASONS,
                "page_sizes": PAGE_SIZES,
                "notice": _notice(request.query_params.get("done"), request.query_params.get("id")),
            },
            session=session,
        )

    async def message(self, request: Request) -> Response:
        """``GET /console/messages/{id}``: a dead letter (or, once replayed, its message)."""
        session = await self._operator(request)
        message_id = self._id(request)
        if message_id is None:
            return self._not_found(request, session)
        letter, record = await run_in_threadpool(self._read, message_id)
        if letter is None and record is None:
            return self._not_found(request, session)
        request_body = letter.request if letter is not None else record.request if record else {}
        state = (record.state if record else "") or ("failed" if letter else "")
        attempts = record.attempts if record else []
        errors_attempt = None
        if letter is not None and letter.errors:
            for entry in attempts:
                if letter.correlation_id and entry.get("cid") == letter.correlation_id:
                    errors_attempt = entry.get("n")
        return self._page(
            request,
            "message.html",
            {
                "id": message_id,
                "letter": letter,
                "record": record.fields if record else {},
                "state": state,
                "moving": state in MOVING_STATES,
                "attempts": attempts,
                "errors_attempt": errors_attempt,
                "request_body": request_body,
                "request_json": json.dumps(request_body, indent=2, ensure_ascii=False),
                "partner": partner_of(request_body),
                "company": company_of(request_body),
                "notice": _notice(request.query_params.get("done"), message_id),
            },
            session=session,
        )

    def _read(self, message_id: str) -> tuple[DeadLetter | None, StatusRecord | None]:
        record = self.runtime.store.lookup(message_id)
        return self.runtime.deadletters.get(message_id), record

    def _not_found(self, request: Request, session: Session) -> Response:
        return self._page(
            request,
            "error.html",
            {"title": "Not found", "text": "No such dead letter or message (or it expired)."},
            404,
            session,
        )

    async def confirm(self, request: Request) -> Response:
        """``GET /console/messages/{id}/replay|delete``: the confirmation step."""
        session = await self._operator(request)
        action = str(request.path_params["action"])
        message_id = self._id(request)
        letter = None
        if message_id is not None and action in ("replay", "delete"):
            letter = await run_in_threadpool(self.runtime.deadletters.get, message_id)
        if letter is None:
            return self._not_found(request, session)
        return self._page(
            request, "confirm.html", {"action": action, "letter": letter}, session=session
        )

    async def act(self, request: Request) -> Response:
        """``POST /console/messages/{id}/replay|delete``: do it (CSRF token required)."""
        session = await self._operator(request)
        self._check_csrf(session, await self._form(request))
        action = str(request.path_params["action"])
        message_id = self._id(request)
        if message_id is None or action not in ("replay", "delete"):
            return self._not_found(request, session)
        store = self.runtime.deadletters
        if action == "replay":
            done = await run_in_threadpool(store.replay, message_id) is not None
        else:
            done = await run_in_threadpool(store.delete, message_id)
        if not done:
            return self._not_found(request, session)
        log.info(
            "console: operator %s: %s %s",
            session.operator,
            action,
            message_id,
            extra={"operator": session.operator, "message_id": message_id, "action": action},
        )
        if action == "replay":
            target = f"{PREFIX}/messages/{message_id}?done=replayed"
        else:
            target = f"{PREFIX}?{urlencode({'done': 'deleted', 'id': message_id})}"
        return RedirectResponse(target, 303, headers=_HEADERS)

    async def login_form(self, request: Request) -> Response:
        """``GET /console/login``: the form; sets a pre-login cookie holding its CSRF token."""
        session = await self._session(request)
        if session is not None and session.logged_in:
            return RedirectResponse(safe_next(request.query_params.get("next")), 303)
        session = session or self.sessions.anonymous()
        response = self._page(
            request,
            "login.html",
            {"next": safe_next(request.query_params.get("next")), "error": None},
            session=session,
        )
        self._set_session(request, response, session)
        return response

    async def login(self, request: Request) -> Response:
        """``POST /console/login``: an operator key for a session."""
        session = await self._session(request)
        form = await self._form(request)
        self._check_csrf(session, form)
        target = safe_next(form.get("next"))
        address = client_address(request)
        blocked = self.limiter.retry_after(address)
        if blocked is not None:
            raise TooManyFailures(blocked)
        key = form.get("key", "").strip().encode("utf-8", "surrogateescape")
        operator = self.keys.operator_of(key)
        if operator is None:
            log.warning("console: login refused (not an operator key)")
            blocked = await run_in_threadpool(self.limiter.record_failure, address)
            if blocked is not None:
                raise TooManyFailures(blocked)
            await asyncio.sleep(LOGIN_FAILURE_DELAY_SECONDS)
            return self._page(
                request,
                "login.html",
                {"next": target, "error": "That is not an operator key."},
                401,
                session,
            )
        log.info("console: operator %s logged in", operator, extra={"operator": operator})
        response = RedirectResponse(target, 303, headers=_HEADERS)
        self._set_session(request, response, await run_in_threadpool(self.sessions.start, operator))
        return response

    async def logout(self, request: Request) -> Response:
        """``POST /console/logout``: end the session (CSRF token required)."""
        session = await self._session(request)
        self._check_csrf(session, await self._form(request))
        if session is not None:
            # The session ends here, in Redis: its cookie, replayed, opens nothing.
            await run_in_threadpool(self.sessions.end, session)
        response = RedirectResponse(f"{PREFIX}/login", 303, headers=_HEADERS)
        response.delete_cookie(
            COOKIE, path=PREFIX, secure=self._secure(request), httponly=True, samesite="strict"
        )
        return response


def _notice(done: str | None, message_id: str | None) -> str | None:
    if done == "deleted" and message_id and is_message_id(message_id):
        return f"Deleted dead letter {message_id}."
    if done == "replayed":
        return "Replayed: the message is back in the queue."
    return None


def _guard(
    endpoint: Callable[[Request], Awaitable[Response]],
) -> Callable[[Request], Awaitable[Response]]:
    # No session: a page redirects to the login form, a POST is 401. Bad CSRF token: 403.
    # Redis down: 503. Every answer is HTML.
    @functools.wraps(endpoint)
    async def wrapped(request: Request) -> Response:
        try:
            return await endpoint(request)
        except Unauthenticated:
            if request.method in ("GET", "HEAD"):
                target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
                login = f"{PREFIX}/login?{urlencode({'next': safe_next(target)})}"
                return RedirectResponse(login, 303, headers=_HEADERS)
            return _plain_page(request, 401, "Not logged in", "Log in with an operator key.")
        except CsrfRefused:
            log.warning(
                "console: %s %s refused: CSRF token missing or wrong",
                request.method,
                request.url.path,
            )
            return _plain_page(
                request,
                403,
                "Form expired",
                "This form's security token is missing or wrong. Reload the page and try again.",
            )
        except FormTooSlow:
            response = _plain_page(
                request, 408, "Too slow", "The form did not arrive in time; try again."
            )
            response.headers["Connection"] = "close"
            return response
        except TooManyFailures as error:
            log.warning("console: login refused: too many wrong keys lately")
            response = _plain_page(
                request,
                429,
                "Too many attempts",
                "Too many wrong keys lately; wait a while and try again.",
            )
            response.headers["Retry-After"] = str(max(1, math.ceil(error.retry_after)))
            return response
        except (RedisConnectionError, RedisTimeoutError) as error:
            log.warning("console 503: Redis is unavailable (%s)", type(error).__name__)
            return _plain_page(request, 503, "Unavailable", "Redis does not answer; try again.")

    return wrapped


def _plain_page(request: Request, status: int, title: str, text: str) -> Response:
    response = TEMPLATES.TemplateResponse(
        request,
        "error.html",
        {"prefix": PREFIX, "session": None, "csrf": None, "title": title, "text": text},
        status_code=status,
    )
    response.headers.update(_HEADERS)
    return response


TEMPLATES.env.filters["when"] = format_ms


def companies_page(
    console: Console, settings: Settings
) -> Callable[[Request], Awaitable[Response]]:
    """``GET /console/companies``: every company (the default one first) and its state."""
    registry = CompanyRegistry.from_settings(console.runtime.redis, settings)

    async def companies(request: Request) -> Response:
        session = await console._operator(request)
        listed = await run_in_threadpool(listing, settings, registry)
        counts = count_states([each.state for each in listed if not each.from_settings])
        return console._page(
            request, "companies.html", {"companies": listed, "counts": counts}, session=session
        )

    return companies


def webhooks_page(console: Console, settings: Settings) -> Callable[[Request], Awaitable[Response]]:
    """``GET /console/webhooks``: each partner's outcome webhook (URL, events, state), never its
    secret; and how many webhook events wait or could not be sent."""
    from worker.rules.endpoints import EndpointRefused, check_url
    from worker.store.webhooks import WebhookStore
    from worker.webhooks.delivery import EndpointBreaker, WebhookPolicy

    store = WebhookStore.from_settings(console.runtime.redis, settings)
    breaker_policy = WebhookPolicy.from_settings(settings).breaker

    def rows() -> dict[str, Any]:
        listed = []
        for config in store.all():
            try:
                endpoint = check_url(config.url, allow_private=True).name
                state = EndpointBreaker(store.redis, breaker_policy, endpoint).status().state
            except EndpointRefused:
                state = "refused"
            listed.append({"config": config, "state": state})
        return {
            "webhooks": listed,
            "pending": store.pending_count(),
            "dead": store.dead_count(),
            "letters": store.dead_letters(limit=20),
        }

    async def webhooks(request: Request) -> Response:
        session = await console._operator(request)
        context = await run_in_threadpool(rows)
        return console._page(request, "webhooks.html", context, session=session)

    return webhooks


def console_routes(
    settings: Settings, runtime: Runtime, limiter: FailureLimiter
) -> list[BaseRoute]:
    """The console's routes, for the service's route list; ``limiter`` is the process's one
    (the API's key checks count and see the same blocks)."""
    console = Console(settings, runtime, limiter)

    def guarded(endpoint: Callable[[Request], Awaitable[Response]]) -> Any:
        return _guard(endpoint)

    return [
        Route(PREFIX, guarded(console.index), methods=["GET"]),
        Route(f"{PREFIX}/login", guarded(console.login_form), methods=["GET"]),
        Route(f"{PREFIX}/login", guarded(console.login), methods=["POST"]),
        Route(f"{PREFIX}/logout", guarded(console.logout), methods=["POST"]),
        Route(f"{PREFIX}/companies", guarded(companies_page(console, settings)), methods=["GET"]),
        Route(f"{PREFIX}/webhooks", guarded(webhooks_page(console, settings)), methods=["GET"]),
        Route(f"{PREFIX}/messages/{{id}}", guarded(console.message), methods=["GET"]),
        Route(f"{PREFIX}/messages/{{id}}/{{action}}", guarded(console.confirm), methods=["GET"]),
        Route(f"{PREFIX}/messages/{{id}}/{{action}}", guarded(console.act), methods=["POST"]),
    ]


__all__ = ["console_routes"]
