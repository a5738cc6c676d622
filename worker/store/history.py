"""The durable history in PostgreSQL (``NOTIFY_HISTORY_URL``): every attempt and outcome.

Redis keeps what is live and a short window of recent outcomes (``NOTIFY_STATUS_TTL_SECONDS``);
the history keeps the rest for ``NOTIFY_HISTORY_DAYS``. Nothing here is on a post's path:

* The outcome scripts (worker/store/lua/, run by records.py) add one entry per attempt and
  outcome (one field, a JSON object) to the outbox stream ``keys.HISTORY_OUTBOX`` in the same
  atomic step as the record. A
  worker that dies after a post loses nothing the history needs: it is in Redis.
* ``HistoryWriter``, a thread in each worker, reads the outbox through the consumer group
  ``keys.HISTORY_GROUP`` in batches, copies them (one binary ``COPY`` per table), commits, and
  only then acknowledges and deletes the entries. A batch whose writer died before that is taken
  over by another writer (``XAUTOCLAIM``) after ``NOTIFY_HISTORY_CLAIM_IDLE_SECONDS`` and written
  again: its copy fails on a row already there (each row's key is its entry's unique key), and
  it is inserted instead (``INSERT ... SELECT FROM unnest(...) ON CONFLICT DO NOTHING``), which
  adds nothing twice.
* Tables are partitioned by day (UTC); the writer makes each day's partitions as it needs them
  and drops those older than ``NOTIFY_HISTORY_DAYS`` once an hour.
* ``read_status`` is where ``MessageStore.lookup`` (``GET /messages/{id}``, ``notify status``,
  the console) finds a message Redis no longer holds.

The schema is plain versioned SQL (worker/store/migrations/NNNN_*.sql), applied by ``notify db
upgrade`` (and by a writer that finds it missing).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from datetime import UTC, date, datetime, timedelta
from importlib import resources
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb
from redis import Redis
from redis.exceptions import RedisError, ResponseError

from worker.ops.background import Loop
from worker.shapes.models import DEFAULT_PARTNER, partner_of
from worker.store import keys
from worker.store.codec import attempt_entry, dumps, is_usual, loads_object

log = logging.getLogger("notify.history")

TABLES = ("notify_attempts", "notify_outcomes")
# Any fixed number: the advisory lock that keeps two processes from changing the schema or the
# partitions at the same moment.
_SCHEMA_LOCK = 0x6E6F7469  # "noti"
PRUNE_INTERVAL_SECONDS = 3600
# How often a writer looks for entries it read but did not write (a failed insert) and for a dead
# writer's (XAUTOCLAIM); in between it only reads new ones, one round trip a batch.
RECOVER_INTERVAL_SECONDS = 5.0
# After a batch smaller than the batch size, a writer waits this long for more: fewer, larger
# transactions, so the writer's CPU stays small beside the deliveries it records.
LINGER_SECONDS = 0.25


# -- schema --------------------------------------------------------------------------------------


def migrations() -> list[tuple[int, str, str]]:
    """``(version, name, sql)`` of every migration shipped, in order."""
    found = []
    for entry in resources.files("worker.store.migrations").iterdir():
        name = entry.name
        if name.endswith(".sql") and name[:4].isdigit():
            found.append((int(name[:4]), name, entry.read_text(encoding="utf-8")))
    return sorted(found)


def connect(url: str) -> psycopg.Connection[Any]:
    """A connection to the history database (autocommit off)."""
    return psycopg.connect(url, connect_timeout=5, application_name="notify-history")


def upgrade(url: str) -> list[str]:
    """Apply the migrations not applied yet; returns their names (empty: up to date)."""
    applied: list[str] = []
    with connect(url) as conn, conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
        conn.execute(
            "CREATE TABLE IF NOT EXISTS notify_schema ("
            " version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        row = conn.execute("SELECT coalesce(max(version), 0) FROM notify_schema").fetchone()
        current = int(row[0]) if row else 0
        for version, name, text in migrations():
            if version > current:
                conn.execute(text.encode("utf-8"))
                conn.execute(
                    "INSERT INTO notify_schema (version, name) VALUES (%s, %s)", (version, name)
                )
                applied.append(name)
    return applied


def schema_version(url: str) -> int:
    """The last migration applied (0: none)."""
    with connect(url) as conn:
        exists = conn.execute("SELECT to_regclass('notify_schema')").fetchone()
        if not exists or exists[0] is None:
            return 0
        row = conn.execute("SELECT coalesce(max(version), 0) FROM notify_schema").fetchone()
        return int(row[0]) if row else 0


def partition_name(table: str, day: date) -> str:
    """The partition of ``table`` that holds ``day`` (UTC)."""
    return f"{table}_p{day:%Y%m%d}"


def ensure_partitions(conn: psycopg.Connection[Any], days: set[date]) -> None:
    """Make the daily partitions of both tables for ``days`` (those missing)."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
        for day in sorted(days):
            start = datetime(day.year, day.month, day.day, tzinfo=UTC)
            for table in TABLES:
                conn.execute(
                    sql.SQL(
                        "CREATE TABLE IF NOT EXISTS {} PARTITION OF {} FOR VALUES FROM ({}) TO ({})"
                    ).format(
                        sql.Identifier(partition_name(table, day)),
                        sql.Identifier(table),
                        sql.Literal(start),
                        sql.Literal(start + timedelta(days=1)),
                    )
                )


def partitions(conn: psycopg.Connection[Any], table: str) -> list[str]:
    """The names of ``table``'s partitions, oldest first."""
    rows = conn.execute(
        "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
        " JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = %s ORDER BY c.relname",
        (table,),
    ).fetchall()
    return [str(row[0]) for row in rows]


def prune(conn: psycopg.Connection[Any], keep_days: int, today: date | None = None) -> list[str]:
    """Drop the daily partitions older than ``keep_days`` (today counts as one); their names."""
    first_kept = (today or datetime.now(UTC).date()) - timedelta(days=keep_days - 1)
    dropped: list[str] = []
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
        for table in TABLES:
            for name in partitions(conn, table):
                suffix = name.rsplit("_p", 1)[-1]
                try:
                    day = datetime.strptime(suffix, "%Y%m%d").date()
                except ValueError:
                    continue
                if day < first_kept:
                    conn.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(name)))
                    dropped.append(name)
    return dropped


# -- the outbox's entries as rows -------------------------------------------------------------


def _ms(value: Any) -> int | None:
    if value == "" or value is None:  # most of an entry's empty fields: no exception raised
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _time(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


class Rows:
    """One batch's rows, as ``COPY`` takes them (and, column by column, ``unnest``)."""

    ATTEMPT_COLUMNS = (
        "at",
        "message_id",
        "seq",
        "number",
        "outcome",
        "http_status",
        "cause",
        "duration_ms",
        "correlation_id",
        "partner",
        "template_id",
    )
    ATTEMPT_TYPES = (
        "timestamptz",
        "text",
        "int4",
        "int4",
        "text",
        "int2",
        "text",
        "int4",
        "text",
        "text",
        "text",
    )
    OUTCOME_COLUMNS = (
        "finished_at",
        "message_id",
        "seq",
        "state",
        "reason",
        "partner",
        "template_id",
        "user_id",
        "session_id",
        "url",
        "request",
        "attempts",
        "replays",
        "http_status",
        "correlation_id",
        "created_at",
        "attempt_at",
        "attempt_ms",
    )
    OUTCOME_TYPES = (
        "timestamptz",
        "text",
        "int4",
        "text",
        "text",
        "text",
        "text",
        "text",
        "text",
        "text",
        "jsonb",
        "int4",
        "int4",
        "int2",
        "text",
        "timestamptz",
        "timestamptz",
        "int4",
    )

    def __init__(self) -> None:
        self.attempts: list[tuple[Any, ...]] = []
        self.outcomes: list[tuple[Any, ...]] = []

    def add(self, fields: dict[str, Any]) -> None:
        """One outbox entry (``outbox`` in worker/store/lua/gauges.lua): an attempt, an outcome, or
        both; its one field ``j`` (a JSON object), or the fields themselves (entries written
        before the JSON form, still in an outbox after an upgrade).
        """
        if "j" in fields:
            # Every value the Lua puts there is a string: taken as they come.
            fields = loads_object(fields["j"])
        message_id = fields.get("id", "")
        seq = _ms(fields.get("k")) or 0
        at = _ms(fields.get("at")) or 0
        request = loads_object(fields.get("rq"))
        partner = partner_of(request) if "rq" in fields else fields.get("p", DEFAULT_PARTNER)
        template = fields["t"] if "t" in fields else request.get("templateId")
        entry: dict[str, Any] | None = None
        held = False  # the attempt is held in the outcome row (migration 0002)
        if "e" in fields:
            entry = attempt_entry(f"0{fields['e']}", at)
            held = (
                seq == 1
                and entry["n"] == 1
                and entry["outcome"] == "delivered"
                and fields.get("st") == "delivered"
                and entry["status"] is not None
                and entry["cause"] == f"http_{entry['status']}"
            )
        if entry is not None and not held:
            self.attempts.append(
                (
                    _time(at),
                    message_id,
                    seq,
                    entry["n"],
                    entry["outcome"],
                    entry["status"],
                    entry["cause"],
                    entry["ms"],
                    entry["cid"],
                    partner,
                    template if isinstance(template, str) else None,
                )
            )
        if "st" not in fields:
            return
        # The table has no company column: a request for a company other than the default keeps
        # its whole JSON (``request``), so the history still says which company it was for.
        compact = is_usual(request) and "company" not in request
        context = request.get("context")
        finished = _ms(fields.get("up")) or at
        created = _ms(fields.get("cr"))
        status = _ms(fields.get("hs"))
        cid = fields.get("ci") or None
        if entry is not None and fields.get("st") == "delivered":
            status, cid = entry["status"], entry["cid"]
        self.outcomes.append(
            (
                _time(finished),
                message_id,
                seq,
                fields.get("st", ""),
                fields.get("rs") or None,
                partner,
                template if isinstance(template, str) else None,
                _text(request.get("userId")),
                _text(request.get("sessionId")),
                _text(context.get("url")) if isinstance(context, dict) else None,
                None if compact else Jsonb(request),
                _ms(fields.get("na")) or (entry["n"] if entry else None),
                _ms(fields.get("rp")) or 0,
                status,
                cid,
                _time(created) if created is not None else None,
                _time(at) if held else None,
                entry["ms"] if held and entry is not None else None,
            )
        )

    def days(self) -> set[date]:
        """The days (UTC) the rows fall on."""
        return {row[0].date() for row in self.attempts} | {row[0].date() for row in self.outcomes}

    def drop_before(self, first_kept: date) -> None:
        """Leave out rows whose day's partition is gone already (older than the history)."""
        self.attempts = [row for row in self.attempts if row[0].date() >= first_kept]
        self.outcomes = [row for row in self.outcomes if row[0].date() >= first_kept]

    def _tables(self) -> list[tuple[str, tuple[str, ...], tuple[str, ...], list[tuple[Any, ...]]]]:
        return [
            ("notify_attempts", self.ATTEMPT_COLUMNS, self.ATTEMPT_TYPES, self.attempts),
            ("notify_outcomes", self.OUTCOME_COLUMNS, self.OUTCOME_TYPES, self.outcomes),
        ]

    def write(self, conn: psycopg.Connection[Any]) -> int:
        """Write every row in one transaction, skipping those written before; how many it added.

        A batch is copied (binary ``COPY``: psycopg formats the rows in C, and PostgreSQL takes
        them without parsing arrays or checking conflicts one by one). A row already there makes
        the copy fail: the batch was written before (a writer died between its commit and its
        acknowledgement, or its batch was taken over), and it is written again with ``insert``,
        which skips those rows.
        """
        try:
            with conn.transaction():
                return self.copy(conn)
        except psycopg.errors.UniqueViolation:
            pass
        with conn.transaction():
            return self.insert(conn)

    def copy(self, conn: psycopg.Connection[Any]) -> int:
        """Copy every row (one ``COPY`` per table); raises ``UniqueViolation`` on a row there."""
        written = 0
        with conn.cursor() as cursor:
            for table, columns, types, rows in self._tables():
                if not rows:
                    continue
                statement = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY)").format(
                    sql.Identifier(table), sql.SQL(", ").join(sql.Identifier(c) for c in columns)
                )
                with cursor.copy(statement) as copy:
                    copy.set_types(types)
                    for row in rows:
                        copy.write_row(row)
                written += len(rows)
        return written

    def insert(self, conn: psycopg.Connection[Any]) -> int:
        """Insert every row (one statement per table), skipping those written before."""
        written = 0
        for table, columns, types, rows in self._tables():
            if not rows:
                continue
            query = sql.SQL(
                "INSERT INTO {} ({}) SELECT * FROM unnest({}) ON CONFLICT DO NOTHING"
            ).format(
                sql.Identifier(table),
                sql.SQL(", ").join(sql.Identifier(c) for c in columns),
                sql.SQL(", ").join(sql.SQL("%s::{}[]").format(sql.SQL(kind)) for kind in types),
            )
            cursor = conn.execute(query, [list(column) for column in zip(*rows, strict=True)])
            written += max(cursor.rowcount, 0)
        return written


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


# -- the writer ----------------------------------------------------------------------------------


class HistoryWriter(Loop):
    """Drains the outbox into PostgreSQL, a batch at a time, on a thread of its own."""

    def __init__(
        self,
        redis: Redis,
        url: str,
        *,
        consumer: str,
        keep_days: int = 30,
        batch_size: int = 1000,
        claim_idle_seconds: float = 60.0,
        block_ms: int = 1000,
    ) -> None:
        self.redis = redis
        self.url = url
        self.consumer = consumer
        self.keep_days = keep_days
        self.batch_size = batch_size
        self.claim_idle_ms = int(claim_idle_seconds * 1000)
        self.block_ms = block_ms
        self.written = 0
        self._conn: psycopg.Connection[Any] | None = None
        self._days: set[date] = set()
        self._pruned = 0.0
        self._pause = 0.5
        super().__init__("notify-history")
        self._warned = 0.0
        self._grouped = False
        self._recovered = 0.0

    # one step

    def _connection(self) -> psycopg.Connection[Any]:
        if self._conn is None or self._conn.closed:
            self._conn = connect(self.url)
            if schema_version(self.url) < max(v for v, _, _ in migrations()):
                log.warning("history: applying the schema migrations (notify db upgrade)")
                upgrade(self.url)
            self._days = set()
        return self._conn

    def _group(self) -> None:
        if self._grouped:
            return
        try:
            # From the start of the stream: entries added before any writer ran count too.
            self.redis.xgroup_create(keys.HISTORY_OUTBOX, keys.HISTORY_GROUP, id="0", mkstream=True)
        except ResponseError as error:
            if "BUSYGROUP" not in str(error):
                raise
        self._grouped = True

    def _read(self) -> list[tuple[str, dict[str, str]]]:
        # Now and then, own entries read and not acknowledged (a failed write) first, then a
        # dead writer's; new ones always.
        sources: tuple[str, ...] = (">",)
        if time.monotonic() - self._recovered >= RECOVER_INTERVAL_SECONDS or not self._recovered:
            self._recovered = time.monotonic()
            sources = ("0", "claim", ">")
        for source in sources:
            if source == "claim":
                reply = self.redis.xautoclaim(
                    keys.HISTORY_OUTBOX,
                    keys.HISTORY_GROUP,
                    self.consumer,
                    self.claim_idle_ms,
                    "0-0",
                    count=self.batch_size,
                )
                entries = [(str(i), dict(f)) for i, f in reply[1] if f]
            else:
                read: Any = self.redis.xreadgroup(
                    keys.HISTORY_GROUP,
                    self.consumer,
                    {keys.HISTORY_OUTBOX: source},
                    count=self.batch_size,
                    block=self.block_ms if source == ">" else None,
                )
                entries = [(str(i), dict(f)) for _, batch in read or [] for i, f in batch if f]
            if entries:
                return entries
        return []

    def step(self) -> int:
        """Write one batch; returns how many entries it took from the outbox."""
        self._group()
        entries = self._read()
        conn = self._connection()
        self._maybe_prune(conn)
        if not entries:
            return 0
        rows = Rows()
        for _, fields in entries:
            rows.add(fields)
        first_kept = datetime.now(UTC).date() - timedelta(days=self.keep_days - 1)
        rows.drop_before(first_kept)
        missing = rows.days() - self._days
        if missing:
            ensure_partitions(conn, missing)
            self._days |= missing
        self.written += rows.write(conn)
        ids = [entry_id for entry_id, _ in entries]
        pipe = self.redis.pipeline(transaction=True)
        pipe.xack(keys.HISTORY_OUTBOX, keys.HISTORY_GROUP, *ids)
        pipe.xdel(keys.HISTORY_OUTBOX, *ids)
        pipe.execute()
        return len(entries)

    def _maybe_prune(self, conn: psycopg.Connection[Any]) -> None:
        if time.monotonic() - self._pruned < PRUNE_INTERVAL_SECONDS and self._pruned:
            return
        self._pruned = time.monotonic()
        today = datetime.now(UTC).date()
        ahead = {today, today + timedelta(days=1)}
        ensure_partitions(conn, ahead - self._days)
        self._days |= ahead
        dropped = prune(conn, self.keep_days, today)
        if dropped:
            self._days = {d for d in self._days if d >= today - timedelta(days=self.keep_days)}
            log.info(
                "history: dropped %d partitions older than %d days", len(dropped), self.keep_days
            )

    def drain(self, timeout: float = 30.0) -> None:
        """Write until the outbox is empty (tests, the bench); raises when it takes too long."""
        deadline = time.monotonic() + timeout
        while self.redis.xlen(keys.HISTORY_OUTBOX) and time.monotonic() < deadline:
            self.step()
        if self.redis.xlen(keys.HISTORY_OUTBOX):
            raise TimeoutError("the history outbox did not drain")

    # the thread

    def _step(self) -> float:
        try:
            taken = self.step()
            self._pause = 0.5
            # A part batch: linger for a fuller one (fewer, larger inserts), or go on at once.
            return LINGER_SECONDS if 0 < taken < self.batch_size else 0.0
        except (psycopg.Error, RedisError, OSError) as error:
            self._close()
            self._grouped = False  # the stream may be gone with a Redis that restarted
            self._recovered = 0.0
            if time.monotonic() - self._warned > 60:
                self._warned = time.monotonic()
                log.warning("history: cannot write (%s); the outbox keeps the entries", error)
        except Exception:
            self._close()
            log.exception("history writer step failed")
        pause, self._pause = self._pause, min(self._pause * 2, 30.0)
        return pause

    def _close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(psycopg.Error):
                self._conn.close()
            self._conn = None

    def stop(self, timeout_seconds: float = 5.0) -> None:
        """Finish the batch in hand and stop."""
        super().stop(timeout_seconds)
        self._close()


# -- reading -------------------------------------------------------------------------------------


_readers = threading.local()


def _reader(url: str) -> psycopg.Connection[Any]:
    conn: psycopg.Connection[Any] | None = getattr(_readers, url, None)
    if conn is None or conn.closed or conn.broken:
        conn = psycopg.connect(
            url, connect_timeout=5, autocommit=True, application_name="notify-history"
        )
        setattr(_readers, url, conn)
    return conn


def lookup(url: str, message_id: str) -> dict[str, Any] | None:
    """A message's last outcome and attempts from the history, as ``MessageStore.status``
    shows a record (with ``"source": "history"``); None when it has none."""
    conn = _reader(url)
    outcome = conn.execute(
        "SELECT finished_at, state, reason, partner, template_id, user_id, session_id, url,"
        " request, attempts, replays, http_status, correlation_id, created_at"
        " FROM notify_outcomes WHERE message_id = %s ORDER BY finished_at DESC, seq DESC LIMIT 1",
        (message_id,),
    ).fetchone()
    if outcome is None:
        return None
    attempts = conn.execute(
        "SELECT at, number, outcome, http_status, cause, duration_ms, correlation_id"
        " FROM notify_attempt_log WHERE message_id = %s ORDER BY at, seq",
        (message_id,),
    ).fetchall()
    (finished, state, reason, partner, template, user, session, url_, request, count, replays) = (
        outcome[:11]
    )
    status, cid, created = outcome[11:]
    if request is None:
        request = {
            "userId": user,
            "sessionId": session,
            "templateId": template,
            "context": {} if url_ is None else {"url": url_},
        }
        if partner != DEFAULT_PARTNER:
            request["partner"] = partner
    return {
        "state": state,
        "req": dumps(request),
        "partner": partner,
        "attempt": "" if count is None else str(count),
        "status": "" if status is None else str(status),
        "cid": cid or "",
        "reason": reason or "",
        "created": "" if created is None else str(int(created.timestamp() * 1000)),
        "updated": str(int(finished.timestamp() * 1000)),
        "replays": str(replays or 0),
        "attempts": [
            {
                "n": row[1],
                "at": int(row[0].timestamp() * 1000),
                "outcome": row[2],
                "status": row[3],
                "cause": row[4],
                "ms": row[5],
                "cid": row[6],
            }
            for row in attempts
        ],
        "source": "history",
    }


def read_status(url: str, message_id: str) -> dict[str, Any] | None:
    """``lookup``, or None (logged) when the history cannot be read: a status answer does not
    fail because the history is down."""
    try:
        return lookup(url, message_id)
    except psycopg.Error as error:
        log.warning("history: cannot read message %s (%s)", message_id, error)
        conn = getattr(_readers, url, None)
        if conn is not None:
            conn.close()
        return None


def settings_url(settings: Any) -> str | None:
    """``NOTIFY_HISTORY_URL`` as text, or None."""
    secret = getattr(settings, "history_url", None)
    return secret.get_secret_value() if secret is not None else None
