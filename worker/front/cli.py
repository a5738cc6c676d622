"""The ``notify`` command: send, inspect failed notifications, run the services.

User mistakes (bad settings, invalid requests, unknown ids, Redis not answering) print one
``error:`` line and exit non-zero; tracebacks are for bugs only.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import TYPE_CHECKING, Any, TypeVar

import click
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from worker.settings import SettingsError
from worker.shapes.contract import HIGHEST_HTTP_STATUS, LOWEST_HTTP_STATUS
from worker.shapes.times import iso_utc

if TYPE_CHECKING:
    from worker.runtime import Runtime

F = TypeVar("F", bound=Callable[..., Any])

EXIT_INVALID = 1
EXIT_CONFIG = 2
EXIT_UNAVAILABLE = 3
EXIT_NOT_FOUND = 4
EXIT_CONFLICT = 5  # an idempotency key used for another request; a message no longer cancellable


def _fail(message: str, code: int) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def friendly_errors(function: F) -> F:
    """Turn the errors a user can cause or fix into one line and an exit code."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from worker.rules.validation import InvalidRequest

        try:
            return function(*args, **kwargs)
        except SettingsError as error:
            _fail(str(error), EXIT_CONFIG)
        except InvalidRequest as error:
            _fail(f"invalid request: {error}", EXIT_INVALID)
        except (RedisConnectionError, RedisTimeoutError, OSError) as error:
            _fail(f"cannot reach Redis or the broker: {error}", EXIT_UNAVAILABLE)

    return wrapper  # type: ignore[return-value]


class _Commands(click.Group):
    """``notify``'s commands, and those other installed packages add (``notify.commands``).

    The dev tooling (``sandbox/``: ``notify dev``, ``notify sandbox``) declares its commands as
    entry points rather than being imported from here, so production code never depends on it
    and an image without it has no such commands. They are loaded only when asked for.
    """

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *_added_commands()})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        command = super().get_command(ctx, cmd_name)
        point = None if command is not None else _added_commands().get(cmd_name)
        if point is None:
            return command
        try:
            loaded = point.load()
        except ImportError:  # declared by the project's metadata, not installed here
            return None
        return loaded if isinstance(loaded, click.Command) else None


@functools.cache
def _runtime() -> Runtime:
    """The command's runtime: its Redis gives up after 2 s of outage, since someone waits."""
    from worker.rules.retries import ANSWERING
    from worker.runtime import Runtime
    from worker.settings import get_settings

    return Runtime.from_settings(get_settings(), redis_patience=ANSWERING)


def _added_commands() -> dict[str, EntryPoint]:
    return {point.name: point for point in entry_points(group="notify.commands")}


@click.group(cls=_Commands)
def main() -> None:
    """Deliver partner messages to SAP Concur users, and manage the ones that failed."""


@main.command()
@click.argument("user_id")
@click.option("--session", "session_id", required=True, help="sessionId of the v4 body")
@click.option("--template", "template_id", required=True, help="templateId (must be allowed)")
@click.option("--url", default=None, help="context.url (must be allowed)")
@click.option(
    "--company",
    default=None,
    help="the user's Concur company: its UUID, connected in the registry [default: the company "
    "the settings define]",
)
@click.option(
    "--expires-at",
    default=None,
    help="its deadline, an RFC 3339 date-time with a time zone (2026-12-01T10:00:00Z): past "
    "it, it is never posted and becomes a dead letter `expired`",
)
@click.option(
    "--idempotency-key",
    default=None,
    help="your key for this request: the same key and request print the same id and queue "
    "nothing; another request under it is refused (exit 5)",
)
@friendly_errors
def send(
    user_id: str,
    session_id: str,
    template_id: str,
    url: str | None,
    company: str | None,
    expires_at: str | None,
    idempotency_key: str | None,
) -> None:
    """Validate and queue one message; print its id."""
    from datetime import UTC, datetime

    from worker.intake.producer import IdempotencyConflict, submit
    from worker.rules import deadlines
    from worker.rules.validation import InvalidRequest, Problem
    from worker.shapes.models import request_body

    deadline = None
    if expires_at is not None:
        parsed = deadlines.parse_deadline(expires_at)
        if isinstance(parsed, Problem):
            raise InvalidRequest([parsed])
        deadline = datetime.fromtimestamp(parsed / 1000, UTC)
    body = request_body(session_id, template_id, url)
    try:
        result = submit(
            user_id,
            body,
            runtime=_runtime(),
            company=company,
            expires_at=deadline,
            idempotency_key=idempotency_key,
        )
    except IdempotencyConflict as conflict:
        _fail(f"{conflict}; nothing queued", EXIT_CONFLICT)
        return
    if result.duplicate:
        click.echo(f"already submitted (state: {result.state}); nothing new queued", err=True)
    click.echo(result.id)


@main.command()
@click.argument("message_id")
@friendly_errors
def cancel(message_id: str) -> None:
    """Cancel a message not yet posted: it ends `cancelled` and is never posted."""
    from worker.shapes.models import is_message_id

    if not is_message_id(message_id):
        _fail(f"no message {message_id!r}", EXIT_NOT_FOUND)
    verdict, state = _runtime().store.cancel(message_id, partner=None)
    if verdict == "missing":
        _fail(f"no message {message_id!r} (unknown, or its status record expired)", EXIT_NOT_FOUND)
    if verdict == "refused":
        being = "being posted" if state == "inflight" else state
        _fail(f"message {message_id} is {being}: it can no longer be cancelled", EXIT_CONFLICT)
    click.echo(f"cancelled {message_id} (was {state})")


def _now_ms() -> int:
    return int(time.time() * 1000)


@main.command()
@click.argument("message_id")
@click.option("--json", "as_json", is_flag=True, help="print the stored record as JSON")
@friendly_errors
def status(message_id: str, as_json: bool) -> None:
    """Show a message's state, attempts, HTTP status, correlation id and next retry."""
    from worker.front import views

    runtime = _runtime()
    record = runtime.store.lookup(message_id)
    if record is None:
        _fail(f"no message {message_id!r} (unknown, or its status record expired)", EXIT_NOT_FOUND)
        return
    if as_json:
        click.echo(json.dumps(record.to_dict(), indent=2, sort_keys=True))
        return
    letter = runtime.deadletters.get(message_id) if record.state == "failed" else None
    views.show(views.message_view(message_id, record, _now_ms(), letter))


@main.group()
def failed() -> None:
    """List, show, replay or delete dead letters (failed notifications)."""


TIME_FORMATS = ["%Y-%m-%d", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%dT%H:%M:%S%z"]


class _Time(click.DateTime):
    """A --since/--until time: click's check (these formats, its message), handed on as typed
    for the one time parser (worker.store.query: --until 2026-11-25 is through that day)."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        """The text, once click's formats accept it and so does ``parse_time``."""
        if not isinstance(value, str):
            return value
        super().convert(value, param, ctx)
        from worker.store.query import parse_time

        try:
            parse_time(value)
        except ValueError as error:
            self.fail(str(error), param, ctx)
        return value


def _company_option(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """--company's check: ``default`` or a company UUID (what the filter can match)."""
    from worker.rules.validation import company_problem

    problem = None if value is None else company_problem(value)
    if problem is not None:
        raise click.BadParameter(problem.message.removeprefix("company "))
    return value


def _filters(function: F) -> F:
    """Add --reason, --template, --user, --since, --until, --partner, --company, --http-status;
    pass them on as one ``selection``."""

    @functools.wraps(function)
    def wrapper(
        *args: Any,
        reason: str | None,
        template_id: str | None,
        user_id: str | None,
        since: str | None,
        until: str | None,
        partner: str | None,
        company: str | None,
        http_status: int | None,
        **kwargs: Any,
    ) -> Any:
        from worker.store.query import DeadLetterFilter, read_filter

        # The options' types checked every value already: nothing is refused here.
        chosen, _refused = read_filter(
            reason=reason,
            template=template_id,
            user=user_id,
            partner=partner,
            since=since,
            until=until,
            http_status=None if http_status is None else str(http_status),
            company=company,
        )
        selection = None if chosen == DeadLetterFilter() else chosen
        return function(*args, selection=selection, **kwargs)

    for option in reversed(
        [
            click.option("--reason", default=None, help="only this reason code"),
            click.option("--template", "template_id", default=None, help="only this templateId"),
            click.option("--user", "user_id", default=None, help="only this userId"),
            click.option(
                "--since",
                default=None,
                type=_Time(TIME_FORMATS),
                help="only those that failed at or after this time (UTC unless an offset is given)",
            ),
            click.option(
                "--until",
                default=None,
                type=_Time(TIME_FORMATS),
                help="only those that failed at or before this time (a date: through that day)",
            ),
            click.option("--partner", default=None, help="only this partner's (see GATEWAY_KEYS)"),
            click.option(
                "--company",
                default=None,
                callback=_company_option,
                help="only those for this company (its UUID, or 'default')",
            ),
            click.option(
                "--http-status",
                default=None,
                type=click.IntRange(LOWEST_HTTP_STATUS, HIGHEST_HTTP_STATUS),
                help="only those whose last answer had this HTTP status",
            ),
        ]
    ):
        wrapper = option(wrapper)
    return wrapper  # type: ignore[return-value]


@failed.command("list")
@_filters
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 10_000))
@click.option("--cursor", default=None, help="the previous page's cursor (its `more:` line)")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@click.option(
    "--kind",
    default="message",
    show_default=True,
    type=click.Choice(["message", "webhook"]),
    help="messages' dead letters, or partners' webhook events that could not be sent (of the "
    "filters, only --partner applies to these)",
)
@friendly_errors
def failed_list(selection: Any, limit: int, cursor: str | None, as_json: bool, kind: str) -> None:
    """List dead letters, newest first."""
    if kind == "webhook":
        _webhook_dead_letters(selection, limit, as_json)
        return
    from worker.store.query import decode_cursor, encode_cursor

    after = None
    if cursor is not None:
        after = decode_cursor(cursor)
        if after is None:
            raise click.BadParameter("not a cursor this command printed", param_hint="--cursor")
    page = _runtime().deadletters.page(selection, after=after, limit=limit)
    next_cursor = None if page.next_cursor is None else encode_cursor(page.next_cursor)
    if as_json:
        click.echo(
            json.dumps(
                {"items": [item.to_dict() for item in page.items], "nextCursor": next_cursor},
                indent=2,
            )
        )
        return
    if not page.items:
        click.echo("no failed notifications")
        return
    from rich.console import Group
    from rich.text import Text

    from worker.front import views

    parts: list[Any] = [views.dead_letters_table(page.items)]
    if next_cursor is not None:
        parts.append(Text(f"more: --cursor {next_cursor}"))
    views.show(Group(*parts))


@failed.command("show")
@click.argument("letter_id")
@click.option("--json", "as_json", is_flag=True, help="print the dead letter as JSON")
@friendly_errors
def failed_show(letter_id: str, as_json: bool) -> None:
    """Show one dead letter in full: reason, HTTP status, the API's errors, attempts."""
    from worker.front import views

    letter = _runtime().deadletters.get(letter_id)
    if letter is None:
        _fail(f"no failed notification {letter_id!r}", EXIT_NOT_FOUND)
    elif as_json:
        click.echo(json.dumps(letter.to_dict(), indent=2))
    else:
        views.show(views.dead_letter_view(letter, _now_ms()))


def _ids_or_all(ids: tuple[str, ...], all_: bool, selection: Any) -> list[str] | None:
    if ids and all_:
        _fail("give ids or --all, not both", EXIT_INVALID)
    if not ids and not all_:
        _fail("give one or more ids, or --all (optionally with filters)", EXIT_INVALID)
    if selection is not None and not all_:
        _fail("filters select with --all only", EXIT_INVALID)
    return list(ids) if ids else None


@dataclass(frozen=True)
class _DeadLetterAction:
    """What ``failed replay`` and ``failed delete`` do, in their words."""

    verb: str
    done: str
    doing: str
    many: Callable[[list[str], Callable[[int], None]], list[str]]  # selected ids, progress
    one: Callable[[str], bool]  # False: no such dead letter
    ask_first: bool = False  # before acting on what --all selects


def _act_on_dead_letters(
    action: _DeadLetterAction,
    chosen: list[str] | None,
    selection: Any,
    *,
    dry_run: bool,
    progress: bool | None,
) -> None:
    """Act on the ids given, or (``chosen`` None) on every dead letter ``selection`` matches."""
    from worker.front import views
    from worker.store.deadletters import DeadLetterFilter

    store = _runtime().deadletters
    if chosen is not None:
        if dry_run:
            found = [letter_id for letter_id in chosen if store.get(letter_id) is not None]
            click.echo(f"would {action.verb} {len(found)}")
            return
        missing = [letter_id for letter_id in chosen if not action.one(letter_id)]
        click.echo(f"{action.done} {len(chosen) - len(missing)}")
        if missing:
            _fail(f"no failed notification {', '.join(map(repr, missing))}", EXIT_NOT_FOUND)
        return
    selected = store.select(selection or DeadLetterFilter())
    if dry_run:
        click.echo(f"would {action.verb} {len(selected)}")
        return
    if selected and action.ask_first:
        click.confirm(f"{action.verb} {len(selected)} dead letters for good?", abort=True)
    with views.Progress(action.doing, len(selected), progress) as bar:
        acted = action.many(selected, bar.advance)
    click.echo(f"{action.done} {len(acted)}")


_progress_option = click.option(
    "--progress/--no-progress",
    default=None,
    help="a progress bar on stderr [default: when stderr is a terminal and the work is long]",
)
# Bulk replay marks this many dead letters queued, then publishes them (as tasks of
# NOTIFY_BATCH_SIZE); a crash in between leaves the marked ones on the schedule, which hands
# them out after the grace period, as DeadLetterStore.replay_many does for all at once.


@failed.command("replay")
@click.argument("ids", nargs=-1)
@click.option("--all", "all_", is_flag=True, help="every dead letter the filters select")
@_filters
@click.option("--dry-run", is_flag=True, help="count what would be replayed; change nothing")
@click.option(
    "--rate",
    default=None,
    type=click.FloatRange(min=0, min_open=True),
    help="replay at most this many a second (with --all)",
)
@_progress_option
@friendly_errors
def failed_replay(
    ids: tuple[str, ...],
    all_: bool,
    selection: Any,
    dry_run: bool,
    rate: float | None,
    progress: bool | None,
) -> None:
    """Send dead letters back through the whole pipeline."""
    store = _runtime().deadletters
    _act_on_dead_letters(
        _DeadLetterAction(
            "replay",
            "replayed",
            "replaying",
            lambda chosen, advance: store.replay_ids(
                chosen, rate_per_second=rate, on_progress=advance
            ),
            lambda letter_id: store.replay(letter_id) is not None,
        ),
        _ids_or_all(ids, all_, selection),
        selection,
        dry_run=dry_run,
        progress=progress,
    )


@failed.command("delete")
@click.argument("ids", nargs=-1)
@click.option("--all", "all_", is_flag=True, help="every dead letter the filters select")
@_filters
@click.option("--dry-run", is_flag=True, help="count what would be deleted; change nothing")
@click.option("--yes", is_flag=True, help="delete what --all selects without asking")
@_progress_option
@friendly_errors
def failed_delete(
    ids: tuple[str, ...],
    all_: bool,
    selection: Any,
    dry_run: bool,
    yes: bool,
    progress: bool | None,
) -> None:
    """Delete dead letters (with --all: asks first, unless --yes)."""
    store = _runtime().deadletters
    _act_on_dead_letters(
        _DeadLetterAction(
            "delete",
            "deleted",
            "deleting",
            lambda chosen, advance: store.delete_ids(chosen, on_progress=advance),
            store.delete,
            ask_first=not yes,
        ),
        _ids_or_all(ids, all_, selection),
        selection,
        dry_run=dry_run,
        progress=progress,
    )


@main.group()
def db() -> None:
    """The PostgreSQL history (NOTIFY_HISTORY_URL): its schema and its old days."""


def _history_url() -> str:
    from worker.settings import get_settings
    from worker.store import history

    url = history.settings_url(get_settings())
    if url is None:
        _fail("NOTIFY_HISTORY_URL is not set: there is no history database", 2)
        raise SystemExit(2)
    return url


@db.command("upgrade")
@friendly_errors
def db_upgrade() -> None:
    """Apply the history schema's migrations not applied yet (safe to run again)."""
    from worker.store import history

    url = _history_url()
    applied = history.upgrade(url)
    for name in applied:
        click.echo(f"applied {name}")
    click.echo(f"schema at version {history.schema_version(url)}")


@db.command("prune")
@friendly_errors
def db_prune() -> None:
    """Drop the history's daily partitions older than NOTIFY_HISTORY_DAYS (writers do it hourly)."""
    from worker.settings import get_settings
    from worker.store import history

    with history.connect(_history_url()) as conn:
        dropped = history.prune(conn, get_settings().history_days)
    click.echo(
        f"dropped {len(dropped)} partitions" + (f": {', '.join(dropped)}" if dropped else "")
    )


@main.group()
def breaker() -> None:
    """The circuit breaker of each geolocation: see them, or force them open or closed."""


def _breaker_line(circuit: Any) -> str:
    status = circuit.status()
    line = (
        f"{circuit.name}: {status.state}  "
        f"({status.failures} of {status.calls} posts failed in the window)"
    )
    if not circuit.policy.enabled:
        line += "; the breaker is off (NOTIFY_BREAKER_ENABLED=false): workers ignore it"
    if status.until_ms:
        line += f"; posts may resume at {iso_utc(status.until_ms)}"
    if status.open_seconds:
        line += f"; open for {status.open_seconds:g}s at a time now"
    return line


def _breakers(names: tuple[str, ...]) -> list[Any]:
    """The breakers named (``default`` or a geolocation's host[:port]); none named: all."""
    breakers = _runtime().breakers
    try:
        return [breakers.named(name) for name in (names or tuple(breakers.names()))]
    except ValueError as error:
        raise click.UsageError(str(error)) from None


@breaker.command("status")
@click.argument("geolocations", nargs=-1)
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@friendly_errors
def breaker_status(geolocations: tuple[str, ...], as_json: bool) -> None:
    """Show each geolocation's breaker (or those named): state, failures in its window.

    `default` is the default company's geolocation; the others are named by host[:port].
    """

    circuits = _breakers(geolocations)
    if as_json:
        statuses = {circuit.name: asdict(circuit.status()) for circuit in circuits}
        click.echo(json.dumps(statuses, indent=2))
        return
    for circuit in circuits:
        click.echo(_breaker_line(circuit))


@breaker.command("open")
@click.argument("geolocations", nargs=-1)
@friendly_errors
def breaker_open(geolocations: tuple[str, ...]) -> None:
    """Stop posting to the geolocations named (none named: every one) until `notify breaker
    close` (messages keep their attempts)."""

    for circuit in _breakers(geolocations):
        circuit.force_open()
        click.echo(_breaker_line(circuit))


@breaker.command("close")
@click.argument("geolocations", nargs=-1)
@friendly_errors
def breaker_close(geolocations: tuple[str, ...]) -> None:
    """Let posts through to the geolocations named (none named: every one) now, with a fresh
    failure window."""

    for circuit in _breakers(geolocations):
        circuit.close()
        click.echo(_breaker_line(circuit))


@main.group()
def companies() -> None:
    """The Concur companies this deployment delivers to: connect, list, show, disconnect."""


def _registry() -> Any:
    from worker.store.companies import CompanyRegistry

    runtime = _runtime()
    return CompanyRegistry.from_settings(runtime.redis, runtime.settings)


def _company_id(company_id: str) -> str:
    from worker.shapes.models import is_company_id

    if not is_company_id(company_id):
        _fail(
            f"{company_id!r} is not a company id: the company's UUID in lower case, "
            "like 0f3c2f6e-4a1b-4c2d-9e8f-7a6b5c4d3e2f",
            EXIT_INVALID,
        )
    return company_id


def _token_value(value: str | None) -> str | None:
    # "-": read from stdin, so the token is not in the shell history or `ps` output.
    if value != "-":
        return value
    line = sys.stdin.readline().strip()
    if not line:
        _fail("no token on stdin", EXIT_INVALID)
    return line


@companies.command("connect")
@click.argument("company_id")
@click.option(
    "--request-token",
    default=None,
    help="the company's request token (App Center or Company Request Token tool; 24 h); "
    "'-' reads it from stdin",
)
@click.option(
    "--refresh-token", default=None, help="a refresh token of the company; '-' reads it from stdin"
)
@click.option("--json", "as_json", is_flag=True, help="print the company as JSON")
@friendly_errors
def companies_connect(
    company_id: str, request_token: str | None, refresh_token: str | None, as_json: bool
) -> None:
    """Connect (or reconnect) a company: exchange its token for a refresh token, stored sealed."""
    from worker.concur import companies as connecting

    if (request_token is None) == (refresh_token is None):
        _fail("give --request-token or --refresh-token (exactly one)", EXIT_INVALID)
    company_id = _company_id(company_id)
    runtime = _runtime()
    try:
        config = connecting.client_config(runtime.settings)
    except connecting.NotConfigured as error:
        _fail(str(error), EXIT_CONFIG)
        return
    try:
        company = connecting.connect(
            _registry(),
            config,
            company_id,
            request_token=_token_value(request_token),
            refresh_token=_token_value(refresh_token),
        )
    except (connecting.ConnectError, ValueError) as error:
        _fail(f"not connected: {error}", EXIT_INVALID)
        return
    if as_json:
        click.echo(json.dumps(company.to_dict(), indent=2))
        return
    from worker.front import views

    views.show(views.company_view(company, _now_ms()))


@companies.command("list")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@friendly_errors
def companies_list(as_json: bool) -> None:
    """List the companies: the default one (from the settings) first, then the registry's."""
    from worker.concur.companies import listing

    listed = listing(_runtime().settings, _registry())
    if as_json:
        click.echo(json.dumps({"companies": [each.to_dict() for each in listed]}, indent=2))
        return
    from worker.front import views

    views.show(views.companies_table(listed, _now_ms()))


@companies.command("show")
@click.argument("company_id")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@friendly_errors
def companies_show(company_id: str, as_json: bool) -> None:
    """Show one company (`default`: the one the settings define)."""
    from worker.concur.companies import find
    from worker.shapes.models import DEFAULT_COMPANY

    if company_id != DEFAULT_COMPANY:
        company_id = _company_id(company_id)
    company = find(_runtime().settings, _registry(), company_id)
    if company is None:
        _fail(f"no company {company_id} in the registry", EXIT_NOT_FOUND)
        return
    if as_json:
        click.echo(json.dumps(company.to_dict(), indent=2))
        return
    from worker.front import views

    views.show(views.company_view(company, _now_ms()))


@companies.command("disconnect")
@click.argument("company_id")
@friendly_errors
def companies_disconnect(company_id: str) -> None:
    """Disconnect a company: its refresh token is deleted; it stays listed as disconnected."""
    company = _registry().disconnect(_company_id(company_id), _now_ms())
    if company is None:
        _fail(f"no company {company_id} in the registry", EXIT_NOT_FOUND)
        return
    click.echo(f"disconnected {company.id}")


@main.command("stats")
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@click.option("--minutes", default=15, show_default=True, type=click.IntRange(1, 120))
@click.option("--partner", default=None, help="cumulative totals of this partner only")
@friendly_errors
def stats_command(as_json: bool, minutes: int, partner: str | None) -> None:
    """Show queued, in flight, waiting for retry, dead letters by reason, delivered per minute."""
    from worker.front.stats import collect

    snapshot = collect(_runtime(), minutes=minutes, partner=partner)
    if as_json:
        click.echo(json.dumps(snapshot.to_dict(), indent=2))
        return
    from worker.front import views

    views.show(views.stats_view(snapshot, minutes))


@main.command()
@click.option("--host", default=None, help="interface to listen on [NOTIFY_SERVICE_HOST]")
@click.option("--port", default=None, type=click.IntRange(1, 65535), help="[NOTIFY_SERVICE_PORT]")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(1, 64))
@friendly_errors
def api(host: str | None, port: int | None, workers: int) -> None:
    """Run the HTTP service: the v4 gateway, message status, failed notifications."""
    import uvicorn

    from worker.settings import get_settings

    settings = get_settings()  # a bad setting stops here, with one line
    for name, keys in (("GATEWAY", settings.gateway_keys), ("OPERATOR", settings.operator_keys)):
        if not keys:
            click.echo(f"warning: NOTIFY_{name}_KEYS is empty: its endpoints answer 401", err=True)
    keyed = {partner for partner, _key in settings.gateway_partners}
    for partner in sorted(set(settings.partner_companies) - keyed):
        # A typo here would leave the partner meant refused (403): say so at start-up.
        click.echo(
            f"warning: NOTIFY_PARTNER_COMPANIES grants partner {partner!r}, which has no key in "
            "NOTIFY_GATEWAY_KEYS",
            err=True,
        )
    from worker.front.httpserver import uvicorn_options
    from worker.ops.logs import configure_from_settings
    from worker.ops.monitoring import init_sentry

    configure_from_settings(settings)
    init_sentry(settings)
    uvicorn.run(
        "worker.front.api:create_app",
        factory=True,
        host=host or settings.service_host,
        port=port or settings.service_port,
        workers=workers,
        # Access lines hold method, path and status only, never headers (no Authorization).
        server_header=False,
        timeout_graceful_shutdown=30,
        # uvicorn's own handlers would bypass our JSON format and redaction; its loggers
        # propagate to the root handler configure_from_settings installed.
        log_config=None,
        # Deadlines, a head size bound and a connection cap against slow clients, and the
        # proxies trusted for X-Forwarded-* (worker/front/httpserver.py).
        **uvicorn_options(settings),
    )


def flower_command(
    port: int, address: str, log_level: str = "info"
) -> tuple[list[str], dict[str, str]]:
    """The argv and environment that run Flower for this app, with auth from the settings.

    The credentials travel in Flower's own environment variables (``FLOWER_BASIC_AUTH``,
    ``FLOWER_COOKIE_SECRET``), not on the command line, where ``ps`` would show them.
    """
    import os

    from worker.settings import get_settings

    settings = get_settings()
    if settings.flower_basic_auth is None or not settings.flower_basic_auth.get_secret_value():
        raise SettingsError(
            "NOTIFY_FLOWER_BASIC_AUTH: not set; Flower shows every message and can stop workers, "
            "so it needs user:password"
        )
    env = dict(os.environ)
    env["FLOWER_BASIC_AUTH"] = settings.flower_basic_auth.get_secret_value()
    if settings.flower_cookie_secret is not None:
        env["FLOWER_COOKIE_SECRET"] = settings.flower_cookie_secret.get_secret_value()
    argv = [sys.executable, "-m", "celery", "-A", "worker", "flower", f"--port={port}"]
    argv.append(f"--address={address}")
    # Scaled-down workers would otherwise be listed as offline forever.
    argv.append("--purge_offline_workers=300")
    argv.append(f"--logging={log_level}")
    return argv, env


@main.command()
@click.option("--port", type=click.IntRange(1, 65535), default=None, help="[NOTIFY_FLOWER_PORT]")
@click.option(
    "--address",
    default=None,
    help="interface to listen on [NOTIFY_FLOWER_ADDRESS; default 127.0.0.1: this machine only]",
)
@click.option(
    "--wait-for-worker",
    "wait_seconds",
    default=120.0,
    show_default=True,
    type=click.FloatRange(0),
    help="start Flower once a worker answers inspect ping, or after this many seconds (0: at once)",
)
@click.option(
    "--log-level",
    default="info",
    show_default=True,
    type=click.Choice(["debug", "info", "warning", "error"]),
    help="Flower's own log lines (warning: problems only)",
)
@friendly_errors
def flower(port: int | None, address: str | None, wait_seconds: float, log_level: str) -> None:
    """Run Flower (the Celery dashboard) with basic auth from NOTIFY_FLOWER_BASIC_AUTH.

    It starts once the first worker answers `inspect ping`, so its first look finds the workers.
    """
    import os

    from worker.settings import get_settings

    settings = get_settings()
    argv, env = flower_command(
        port or settings.flower_port, address or settings.flower_address, log_level
    )
    if wait_seconds > 0:
        from worker import app as celery_app
        from worker.front.flowerstart import wait_for_worker

        wait_for_worker(celery_app, wait_seconds, lambda line: click.echo(line, err=True))
    os.execve(argv[0], argv, env)


# -- partners' outcome webhooks (docs/webhooks.md) ---------------------------------------------


@main.group()
def partners() -> None:
    """Partners' settings kept in Redis: their outcome webhooks."""


@partners.group()
def webhook() -> None:
    """A partner's outcome webhook: set, show, rotate its secret, test, remove."""


def _webhooks() -> Any:
    from worker.store.webhooks import WebhookStore

    runtime = _runtime()
    return WebhookStore.from_settings(runtime.redis, runtime.settings)


def _partner_name(partner: str) -> str:
    from worker.shapes.models import is_partner_name

    if not is_partner_name(partner):
        _fail(f"{partner!r} is not a partner name (lower-case letters, digits, _.-)", EXIT_INVALID)
    return partner


def _webhook_lines(config: Any, breaker: Any) -> list[str]:
    lines = [
        f"partner:  {config.partner}",
        f"url:      {config.url}",
        f"events:   {', '.join(config.events)}",
        f"endpoint: breaker {breaker.state}",
        f"updated:  {iso_utc(config.updated_ms) or '-'}",
    ]
    if config.rotating_until_ms:
        lines.append(f"previous secret signs too until {iso_utc(config.rotating_until_ms)}")
    return lines


def _endpoint_breaker(url: str) -> Any:
    from worker.rules.endpoints import EndpointRefused, check_url
    from worker.webhooks.delivery import EndpointBreaker, WebhookPolicy

    runtime = _runtime()
    try:
        name = check_url(url, allow_private=True).name
    except EndpointRefused:
        name = "refused"
    return EndpointBreaker(
        runtime.redis, WebhookPolicy.from_settings(runtime.settings).breaker, name
    ).status()


@webhook.command("set")
@click.argument("partner")
@click.argument("url")
@click.option(
    "--events",
    default=None,
    help="comma-separated: message.failed, message.expired, message.delivered "
    "[default: message.failed,message.expired]",
)
@friendly_errors
def webhook_set(partner: str, url: str, events: str | None) -> None:
    """Send PARTNER's outcome events to URL (https); prints the signing secret on its last line.

    Setting an existing webhook again keeps its secret (`rotate` makes a new one).
    """
    from worker.rules.endpoints import EndpointRefused, check_url
    from worker.store.webhooks import parse_events

    partner = _partner_name(partner)
    settings = _runtime().settings
    try:
        check_url(url, allow_private=settings.webhook_allow_private)
        chosen = parse_events(events)
    except EndpointRefused as error:
        _fail(f"URL refused: {error.detail}", EXIT_INVALID)
        return
    except ValueError as error:
        _fail(str(error), EXIT_INVALID)
        return
    known = {name for name, _key in settings.gateway_partners} | {"default"}
    if partner not in known:
        click.echo(f"warning: partner {partner!r} has no key in NOTIFY_GATEWAY_KEYS", err=True)
    from worker.store.webhooks import NoSealingKey

    try:
        config, secret = _webhooks().set(partner, url, chosen)
    except NoSealingKey as error:
        _fail(str(error), EXIT_CONFIG)
        return
    click.echo(f"webhook of {config.partner}: {config.url}")
    click.echo(f"events: {', '.join(config.events)}")
    click.echo("signing secret (give it to the partner; `show` never prints it):")
    click.echo(secret)


@webhook.command("show")
@click.argument("partner", required=False)
@click.option("--json", "as_json", is_flag=True, help="print JSON")
@friendly_errors
def webhook_show(partner: str | None, as_json: bool) -> None:
    """Show PARTNER's webhook (no PARTNER: every partner's); never the secret."""
    store = _webhooks()
    if partner is None:
        configs = store.all()
    else:
        found = store.get(_partner_name(partner))
        if found is None:
            _fail(f"partner {partner} has no webhook", EXIT_NOT_FOUND)
        configs = [found]
    if as_json:
        items = [
            {**config.to_json(), "breaker": _endpoint_breaker(config.url).state}
            for config in configs
        ]
        click.echo(json.dumps(items[0] if partner else {"webhooks": items}, indent=2))
        return
    if not configs:
        click.echo("no webhooks")
    for index, config in enumerate(configs):
        if index:
            click.echo("")
        click.echo("\n".join(_webhook_lines(config, _endpoint_breaker(config.url))))


@webhook.command("rotate")
@click.argument("partner")
@friendly_errors
def webhook_rotate(partner: str) -> None:
    """A new signing secret for PARTNER (printed on the last line); the old one keeps signing
    for NOTIFY_WEBHOOK_ROTATION_GRACE_SECONDS."""
    runtime = _runtime()
    from worker.store.webhooks import NoSealingKey

    try:
        secret = _webhooks().rotate(_partner_name(partner))
    except KeyError:
        _fail(f"partner {partner} has no webhook", EXIT_NOT_FOUND)
        return
    except NoSealingKey as error:
        _fail(str(error), EXIT_CONFIG)
        return
    grace = runtime.settings.webhook_rotation_grace_seconds
    click.echo(f"events are signed with the old secret too for {grace} s; the new secret:")
    click.echo(secret)


@webhook.command("test")
@click.argument("partner")
@click.option(
    "--wait",
    default=30.0,
    show_default=True,
    type=click.FloatRange(0),
    help="seconds to wait for a worker to send it (0: do not wait)",
)
@friendly_errors
def webhook_test(partner: str, wait: float) -> None:
    """Send PARTNER's endpoint a `webhook.test` event (through the workers, signed as any other)."""
    store = _webhooks()
    try:
        event_id = store.test_event(_partner_name(partner))
    except KeyError:
        _fail(f"partner {partner} has no webhook", EXIT_NOT_FOUND)
        return
    click.echo(f"test event {event_id} queued")
    if wait <= 0:
        return
    deadline = time.monotonic() + wait
    event = store.event(event_id)
    while event is not None and event.state != "dead" and event.attempts == 0:
        if time.monotonic() > deadline:
            _fail(f"not sent within {wait:g} s (is a worker running?)", EXIT_UNAVAILABLE)
        time.sleep(0.2)
        event = store.event(event_id)
    if event is None:
        click.echo("sent: the endpoint answered 2xx")
        return
    _fail(f"not sent: {event.detail or event.dead_reason or 'failed'} (retried as any event)", 1)


@webhook.command("remove")
@click.argument("partner")
@friendly_errors
def webhook_remove(partner: str) -> None:
    """Remove PARTNER's webhook (its events not yet sent become webhook dead letters)."""
    if not _webhooks().remove(_partner_name(partner)):
        _fail(f"partner {partner} has no webhook", EXIT_NOT_FOUND)
    click.echo(f"removed the webhook of {partner}")


@webhook.command("redeliver")
@click.argument("event_ids", nargs=-1, required=True)
@friendly_errors
def webhook_redeliver(event_ids: tuple[str, ...]) -> None:
    """Send webhook dead letters (`notify failed list --kind webhook`) again."""
    store = _webhooks()
    missing = [event_id for event_id in event_ids if not store.replay(event_id)]
    click.echo(f"redelivering {len(event_ids) - len(missing)}")
    if missing:
        _fail(f"no webhook dead letter {', '.join(missing)}", EXIT_NOT_FOUND)


@webhook.command("forget")
@click.argument("event_ids", nargs=-1)
@click.option("--all", "all_", is_flag=True, help="every webhook dead letter (of --partner)")
@click.option("--partner", default=None, help="with --all: only this partner's")
@friendly_errors
def webhook_forget(event_ids: tuple[str, ...], all_: bool, partner: str | None) -> None:
    """Delete webhook dead letters (they are kept until deleted or sent again)."""
    if bool(event_ids) == all_:
        _fail("give event ids or --all (not both)", EXIT_INVALID)
    store = _webhooks()
    if all_:
        chosen = [letter.id for letter in store.dead_letters(limit=10**9, partner=partner)]
    else:
        chosen = list(event_ids)
    gone = sum(1 for event_id in chosen if store.forget(event_id))
    click.echo(f"deleted {gone}")
    if not all_ and gone < len(chosen):
        _fail(f"{len(chosen) - gone} of them were no webhook event", EXIT_NOT_FOUND)


def _webhook_dead_letters(selection: Any, limit: int, as_json: bool) -> None:
    partner = getattr(selection, "partner", None) if selection is not None else None
    letters = _webhooks().dead_letters(limit=limit, partner=partner)
    if as_json:
        click.echo(json.dumps({"items": [letter.to_json() for letter in letters]}, indent=2))
        return
    if not letters:
        click.echo("no failed webhook events")
        return
    for letter in letters:
        click.echo(
            f"{letter.id}  {letter.partner}  {letter.type}  message {letter.message_id or '-'}  "
            f"{letter.dead_reason}  {letter.detail or ''}  attempts {letter.attempts}  "
            f"{iso_utc(letter.dead_ms) or ''}"
        )
