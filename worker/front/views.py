"""What ``notify`` shows a person: messages, dead letters and counts as text for a terminal.

Pure functions from the stored shapes (a ``StatusRecord`` from ``MessageStore.lookup``, a
``DeadLetter``, a stats ``Snapshot``) to ``rich`` renderables, plus the few helpers that print
them: times as ISO-8601 UTC with a relative hint ("in 4 min", "2 h ago"), tables that fit the
terminal's width (ids are folded, never cut; free text is shortened with an ellipsis), and a
pager when the output is taller than the terminal. ``--json`` bypasses all of this.

Every value shown comes from partners or from Concur (ids, URLs, error texts), so it is shown
as plain text (``plain``): a ``rich.text.Text``, never markup (``[link=…]`` stays those
characters), with C0/C1 control characters written out (``\\x1b``), so a stored value cannot
clear an operator's screen, retitle the terminal or hide a link in it.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import sys
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Literal

import click
from rich.console import Console, Group, RenderableType
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    TaskID,
    TaskProgressColumn,
    TextColumn,
    TimeRemainingColumn,
)
from rich.progress import Progress as RichProgress
from rich.table import Table
from rich.text import Text

from worker.settings import GEOLOCATIONS
from worker.shapes.times import int_or_none, iso_utc

if TYPE_CHECKING:
    from worker.front.stats import Stats
    from worker.store.codec import DeadLetter, StatusRecord
    from worker.store.companies import Company

# state in Redis -> what it means to a person.
STATE_TEXT = {
    "queued": "queued (waiting for a worker)",
    "inflight": "in flight (an attempt is under way)",
    "retrying": "retrying (waiting for the next attempt)",
    "delivered": "delivered",
    "failed": "failed (a dead letter)",
    "cancelled": "cancelled (never posted)",
}
OUTCOME_STYLE = {"delivered": "green", "retry": "yellow", "dead": "red", "deferred": "cyan"}
STATE_STYLE = {"delivered": "green", "retrying": "yellow", "failed": "red", "inflight": "cyan"}

# C0 controls, DEL and C1 controls: ESC starts terminal sequences (CSI, OSC 8 links, titles),
# and C1's CSI (U+009B) and OSC (U+009D) do the same on terminals that read 8-bit controls.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def printable(text: str) -> str:
    """``text`` with each control character written as an escape: ``\\x1b``, ``\\x0a``."""
    return _CONTROL.sub(lambda found: f"\\x{ord(found.group()):02x}", text)


def plain(value: Any, style: str = "") -> Text:
    """``value`` as text to show as it is: no markup, control characters escaped."""
    return Text(printable(str(value)), style=style)


def iso(ms: Any) -> str:
    """Epoch milliseconds as ``2026-11-25T17:12:40Z``; ``-`` for none."""
    return iso_utc(ms) or "-"


def relative(ms: Any, now_ms: int) -> str:
    """How far ``ms`` is from now, in words: ``in 4 min``, ``35 s ago``, ``now``."""
    number = int_or_none(ms)
    if not number or number <= 0:
        return ""
    seconds = (number - now_ms) / 1000
    span = abs(seconds)
    if span < 1:
        return "now"
    if span < 60:
        words = f"{span:.0f} s"
    elif span < 3600:
        words = f"{span / 60:.0f} min"
    elif span < 86_400:
        hours, minutes = divmod(round(span / 60), 60)
        words = f"{hours} h" + (f" {minutes} min" if minutes else "")
    else:
        days, hours = divmod(round(span / 3600), 24)
        words = f"{days} d" + (f" {hours} h" if hours else "")
    return f"in {words}" if seconds > 0 else f"{words} ago"


def when(ms: Any, now_ms: int) -> str:
    """ISO time with its relative hint: ``2026-11-25T17:16:40Z (in 4 min)``."""
    text = iso(ms)
    hint = relative(ms, now_ms)
    return f"{text} ({hint})" if hint and text != "-" else text


def _fields() -> Table:
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold", no_wrap=True)
    table.add_column(overflow="fold")
    return table


def _add_request(
    fields: Table, request: Mapping[str, Any], partner: Any = None, company: Any = None
) -> None:
    context = request.get("context")
    url = context.get("url") if isinstance(context, dict) else None
    fields.add_row("user", plain(request.get("userId") or "-"))
    fields.add_row("session", plain(request.get("sessionId") or "-"))
    fields.add_row("template", plain(request.get("templateId") or "-"))
    if url:
        fields.add_row("url", plain(url))
    if partner and partner != "default":  # the partner of unkeyed producers: nothing to tell
        fields.add_row("partner", plain(partner))
    if company and company != "default":  # the settings' company: nothing new to tell
        fields.add_row("company", plain(company))


def attempts_table(entries: Iterable[Mapping[str, Any]], width: int | None = None) -> Table:
    """A message's attempts, oldest first: number, time, outcome, HTTP status, correlation id;
    the duration and the cause too when the terminal has room (100 columns)."""
    wide = (width or terminal_width()) >= 100
    table = Table(
        title="attempts", title_justify="left", header_style="bold", box=None, pad_edge=False
    )
    table.add_column("#", justify="right", no_wrap=True, min_width=2)
    table.add_column("AT (UTC)", no_wrap=True, min_width=20)
    table.add_column("OUTCOME", no_wrap=True, min_width=9)
    table.add_column("HTTP", justify="right", no_wrap=True, min_width=4)
    if wide:
        table.add_column("TOOK", justify="right", no_wrap=True, min_width=7)
    table.add_column("CORRELATION ID", overflow="fold", min_width=12)
    if wide:
        table.add_column("CAUSE", overflow="ellipsis", no_wrap=True, max_width=40)
    for entry in entries:
        outcome = str(entry.get("outcome") or "-")
        duration = int_or_none(entry.get("ms"))
        cells: list[Text] = [
            plain(entry.get("n") or "-"),
            plain(iso(entry.get("at"))),
            plain(outcome, style=OUTCOME_STYLE.get(outcome, "")),
            plain(entry.get("status") or "-"),
        ]
        if wide:
            cells.append(plain("-" if duration is None else f"{duration} ms"))
        cells.append(plain(entry.get("cid") or "-"))
        if wide:
            cells.append(plain(entry.get("cause") or ""))
        table.add_row(*cells)
    return table


def message_view(
    message_id: str,
    record: StatusRecord,
    now_ms: int,
    letter: DeadLetter | None = None,
    width: int | None = None,
) -> RenderableType:
    """A status record (``MessageStore.lookup``) for a person; ``letter`` adds the failure."""
    state = record.state or "unknown"
    fields = _fields()
    fields.add_row("message", plain(message_id))
    fields.add_row("state", plain(STATE_TEXT.get(state, state), style=STATE_STYLE.get(state, "")))
    _add_request(fields, record.request, record.get("partner"), record.company)
    entries = record.attempts
    posted = int_or_none(record.get("attempt"))
    fields.add_row("attempts", plain(posted if posted is not None else len(entries)))
    fields.add_row("HTTP status", plain(int_or_none(record.get("status")) or "-"))
    fields.add_row("correlation id", plain(record.get("cid") or "-"))
    fields.add_row("created", plain(when(record.get("created"), now_ms)))
    fields.add_row("updated", plain(when(record.get("updated"), now_ms)))
    if state == "retrying":
        fields.add_row("next retry", plain(when(record.get("next"), now_ms)))
    if record.get("exp"):
        fields.add_row("deadline", plain(when(record.get("exp"), now_ms)))
    if state == "inflight":
        fields.add_row("lease ends", plain(when(record.get("lease"), now_ms)))
    if state == "failed":
        reason = letter.reason if letter is not None else str(record.get("reason") or "-")
        fields.add_row("dead-letter reason", plain(reason, style="red"))
        if letter is not None and letter.detail:
            fields.add_row("detail", plain(letter.detail))
        if letter is not None:
            for error in letter.errors:
                fields.add_row("API error", plain(_error_text(error)))
    replays = int_or_none(record.get("replays"))
    if replays:
        fields.add_row("replays", plain(replays))
    parts: list[RenderableType] = [fields]
    if entries:
        parts += [Text(""), attempts_table(entries, width)]
    return Group(*parts)


def _error_text(error: Mapping[str, Any]) -> str:
    code = error.get("errorCode") or error.get("ErrorCode") or error.get("code")
    text = error.get("errorMessage") or error.get("ErrorMessage") or error.get("message")
    if code is None and text is None:
        return json.dumps(error, ensure_ascii=False)
    return f"{code or '-'}: {text or ''}".rstrip(": ")


def dead_letter_view(letter: DeadLetter, now_ms: int) -> RenderableType:
    """One dead letter in full, for a person."""
    fields = _fields()
    fields.add_row("dead letter", plain(letter.id))
    fields.add_row("reason", plain(letter.reason or "-", style="red"))
    if letter.detail:
        fields.add_row("detail", plain(letter.detail))
    fields.add_row("HTTP status", plain(letter.status or "-"))
    for error in letter.errors:
        fields.add_row("API error", plain(_error_text(error)))
    _add_request(fields, letter.request, letter.request.get("partner"), letter.company)
    fields.add_row("attempts", plain(letter.attempts))
    fields.add_row("first attempt", plain(when(letter.first_attempt_ms, now_ms)))
    fields.add_row("last attempt", plain(when(letter.last_attempt_ms, now_ms)))
    fields.add_row("failed at", plain(when(letter.dead_ms, now_ms)))
    fields.add_row("created", plain(when(letter.created_ms, now_ms)))
    fields.add_row("correlation id", plain(letter.correlation_id or "-"))
    fields.add_row("replays", plain(letter.replays))
    if letter.worker or letter.task_id:
        fields.add_row("worker / task", plain(f"{letter.worker or '-'} / {letter.task_id or '-'}"))
    hint = plain(f"replay: notify failed replay {letter.id}", style="dim")
    return Group(fields, Text(""), hint)


# Columns of `notify failed list` after the id and the time (never shortened): their narrowest
# useful widths; a narrow terminal drops whole columns in _DROP_ORDER, then shortens those in
# _SHRINK_ORDER with an ellipsis.
_NARROWEST = {"REASON": 10, "HTTP": 4, "TEMPLATE": 8, "USER": 8}
_DROP_ORDER = ("TEMPLATE", "HTTP", "USER")
_SHRINK_ORDER = ("USER", "TEMPLATE", "REASON")
_GAP = 2


def clip(text: str, width: int) -> str:
    """``text`` in at most ``width`` characters, ending in an ellipsis when shortened."""
    return text if len(text) <= width else text[: max(width - 1, 0)] + "…"


def dead_letters_table(letters: Iterable[DeadLetter], width: int | None = None) -> Table:
    """A page of dead letters, newest first, as a table that fits ``width`` columns."""
    letters = list(letters)
    width = width or terminal_width()
    # Escaped before widths are measured, so a column is as wide as what it shows.
    cells = [
        {
            "REASON": printable(letter.reason or "-"),
            "HTTP": str(letter.status or "-"),
            "TEMPLATE": printable(letter.template_id or "-"),
            "USER": printable(letter.user_id or "-"),
        }
        for letter in letters
    ]
    id_width = max((len(printable(letter.id)) for letter in letters), default=2)
    budget = width - id_width - _GAP - 20
    widths = {name: max([len(name)] + [len(row[name]) for row in cells]) for name in _NARROWEST}
    for name in _DROP_ORDER:
        if sum(min(widths[n], _NARROWEST[n]) + _GAP for n in widths) <= budget:
            break
        del widths[name]
    for name in _SHRINK_ORDER:
        excess = sum(w + _GAP for w in widths.values()) - budget
        if excess <= 0 or name not in widths:
            continue
        widths[name] -= min(excess, max(widths[name] - _NARROWEST[name], 0))
    table = Table(header_style="bold", expand=False, box=None, pad_edge=False)
    table.add_column("ID", no_wrap=True, min_width=id_width)
    table.add_column("FAILED AT (UTC)", no_wrap=True, min_width=20)
    for name, column_width in widths.items():
        justify: Literal["left", "right"] = "right" if name == "HTTP" else "left"
        table.add_column(name, no_wrap=True, width=column_width, justify=justify)
    for letter, row in zip(letters, cells, strict=True):
        values = [plain(clip(row[name], column_width)) for name, column_width in widths.items()]
        if "REASON" in widths:
            values[0].stylize("red")
        table.add_row(plain(letter.id), plain(iso(letter.dead_ms)), *values)
    return table


def stats_view(snapshot: Stats, minutes: int) -> RenderableType:
    """``notify stats``: the counts, then delivered per minute as a small bar chart."""
    fields = _fields()
    dead = printable(", ".join(f"{r} {n}" for r, n in sorted(snapshot.dead_letters.items()) if n))
    rows = [
        ("waiting in lanes", str(snapshot.waiting_in_lanes)),
        (f"queued (queue {snapshot.queue})", str(snapshot.queued)),
        ("reserved by workers", str(snapshot.reserved)),
        ("in flight", str(snapshot.inflight)),
        ("waiting for retry", str(snapshot.retry_waiting)),
        ("dead letters", f"{snapshot.dead_letters_total}" + (f"  ({dead})" if dead else "")),
        ("delivered, last full minute", str(snapshot.delivered_last_minute)),
        ("delivered in all", str(snapshot.totals.get("delivered", 0))),
        ("retries in all", str(snapshot.totals.get("retried", 0))),
        ("dead-lettered in all", str(snapshot.totals.get("dead_lettered", 0))),
        ("rate-limit penalty", f"x{snapshot.rate_limit_penalty_factor:g}"),
        ("circuit breaker", str(snapshot.breaker_state)),
    ]
    for name, value in rows:
        fields.add_row(plain(name), plain(value))
    companies = ", ".join(f"{n} {state}" for state, n in snapshot.companies.items() if n)
    if companies:
        fields.add_row("companies (registry)", plain(companies))
    for rank, (company, waiting) in enumerate(snapshot.waiting_by_company.items()):
        # The companies with the most messages not finished yet, most first.
        name = "waiting, by company" if rank == 0 else ""
        fields.add_row(plain(name), plain(f"{waiting}  {company}"))
    chart = Table(
        title=f"delivered per minute (UTC, oldest first, last {minutes})",
        title_justify="left",
        header_style="bold",
        box=None,
        pad_edge=False,
    )
    chart.add_column("minute", no_wrap=True)
    chart.add_column("delivered", justify="right", no_wrap=True)
    chart.add_column("", overflow="crop", no_wrap=True, ratio=1)
    peak = max((minute.delivered for minute in snapshot.delivered_per_minute), default=0)
    for minute in snapshot.delivered_per_minute:
        share = minute.delivered / peak if peak else 0.0
        chart.add_row(
            plain(iso(minute.minute_start_ms)[11:16]),
            plain(minute.delivered),
            Text("█" * max(round(share * 40), 1 if minute.delivered else 0), style="green"),
        )
    return Group(fields, Text(""), chart)


COMPANY_STATE_STYLE = {"connected": "green", "needs_reconnect": "yellow", "disconnected": "red"}


def _company_name(company: Company) -> Text:
    # Every value as Text: what Concur or Redis hands back is shown, never read as markup.
    return plain(f"{company.id} (settings)" if company.from_settings else company.id)


def geolocation_name(geolocation: str | None) -> str:
    """A geolocation as short as it stays clear: Concur's name for it (``us2``) when it is one
    of the known base hosts, else its host (and port)."""
    if not geolocation:
        return "-"
    base = geolocation.rstrip("/")
    for name, known in GEOLOCATIONS.items():
        if base == known:
            return name
    return base.partition("://")[2] or base


def companies_table(companies: Iterable[Company], now_ms: int) -> Table:
    """``notify companies list``: id, state, geolocation, connected, last refreshed; narrow
    enough for 100 columns (``show`` and ``--json`` have the full values)."""
    table = Table(header_style="bold", expand=False, box=None, pad_edge=False)
    table.add_column("ID", no_wrap=True)
    table.add_column("STATE", no_wrap=True)
    table.add_column("GEOLOCATION", no_wrap=True, overflow="ellipsis", max_width=30)
    table.add_column("CONNECTED", no_wrap=True)
    table.add_column("LAST REFRESHED", no_wrap=True)
    for company in companies:
        table.add_row(
            _company_name(company),
            plain(company.state, style=COMPANY_STATE_STYLE.get(company.state, "")),
            plain(geolocation_name(company.geolocation)),
            plain(iso(company.connected_ms)[:10]),  # the day; `show` has the time
            plain(relative(company.refreshed_ms, now_ms) or "-"),
        )
    return table


def company_view(company: Company, now_ms: int) -> RenderableType:
    """``notify companies show``: one company in full (never its token)."""
    fields = _fields()
    fields.add_row("company", _company_name(company))
    fields.add_row("state", plain(company.state, style=COMPANY_STATE_STYLE.get(company.state, "")))
    fields.add_row("reason", plain(company.reason or "-"))
    fields.add_row("geolocation", plain(company.geolocation or "-"))
    fields.add_row("connected", plain(when(company.connected_ms, now_ms)))
    fields.add_row("last refreshed", plain(when(company.refreshed_ms, now_ms)))
    fields.add_row("state changed", plain(when(company.state_ms, now_ms)))
    fields.add_row("refresh token expires", plain(when(company.refresh_expires_ms, now_ms)))
    parts: list[RenderableType] = [fields]
    if company.state == "needs_reconnect":
        hint = f"reconnect: notify companies connect {company.id} --request-token -"
        parts += [Text(""), plain(hint, style="dim")]
    return Group(*parts)


def terminal_width() -> int:
    """Columns to fit: ``COLUMNS`` when set, else the terminal's, else 100 (piped output)."""
    fallback = 100
    columns = os.environ.get("COLUMNS", "")
    if columns.isdigit() and int(columns) > 0:
        return int(columns)
    if sys.stdout.isatty():
        return shutil.get_terminal_size((fallback, 24)).columns
    return fallback


def render(renderable: RenderableType, *, width: int | None = None) -> str:
    """The renderable as text for stdout: colours only on a terminal, at the terminal's width
    (``COLUMNS`` when set, else 100 when not a terminal)."""
    terminal = sys.stdout.isatty()
    width = width or terminal_width()
    buffer = io.StringIO()
    console = Console(
        file=buffer,
        width=width,
        force_terminal=terminal,
        no_color=not terminal,
        highlight=False,
        soft_wrap=False,
    )
    console.print(renderable)
    # Tables pad every line to their width; trailing blanks only get in a reader's way.
    return "".join(line.rstrip() + "\n" for line in buffer.getvalue().splitlines())


def show(renderable: RenderableType, *, pager: bool = True) -> None:
    """Print to stdout; through the pager (``$PAGER``, else ``less``) when stdout is a terminal
    and the text is taller than it."""
    text = render(renderable)
    height = shutil.get_terminal_size((100, 24)).lines
    if pager and sys.stdout.isatty() and text.count("\n") > height - 2:
        os.environ.setdefault("LESS", "FRX")  # keep colours; quit at once if it fits after all
        click.echo_via_pager(text)
    else:
        click.echo(text, nl=False)


# Fewer items than this finish before a bar would be worth drawing.
PROGRESS_MIN_ITEMS = 100


class Progress:
    """A progress bar on stderr for a long bulk operation; ``enabled`` None means: when stderr
    is a terminal and there are at least ``PROGRESS_MIN_ITEMS`` items."""

    def __init__(self, label: str, total: int, enabled: bool | None = None) -> None:
        if enabled is None:
            enabled = total >= PROGRESS_MIN_ITEMS and sys.stderr.isatty()
        self._bar: RichProgress | None = None
        self._task: TaskID | None = None
        if enabled:
            self._bar = RichProgress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TaskProgressColumn(),
                TimeRemainingColumn(),
                console=Console(stderr=True),
                transient=False,
            )
            self._task = self._bar.add_task(label, total=total)

    def __enter__(self) -> Progress:
        if self._bar is not None:
            self._bar.start()
        return self

    def advance(self, count: int) -> None:
        """``count`` more items are done."""
        if self._bar is not None and self._task is not None:
            self._bar.advance(self._task, count)

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()
