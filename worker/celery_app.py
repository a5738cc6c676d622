"""The worker process's Celery app (``celery -A worker worker`` finds it as ``worker.app``).

The app is configured in ``worker.queue.config``; this module connects what a worker process
starts and stops around it: logging, Sentry, the configuration check, the mover and liveness
threads, the history writer, and the held-message bookkeeping for each received task.
"""

from __future__ import annotations

import sys
from typing import Any

from celery import signals

from worker.delivery.dispatcher import Dispatcher, DispatchPolicy, OpenBreakers
from worker.delivery.mover import Liveness, Mover
from worker.ops.logs import configure_from_settings
from worker.ops.monitoring import init_sentry
from worker.ops.tracing import flush, instrument_celery
from worker.queue.config import SEND_TASK, app_for
from worker.runtime import get_runtime
from worker.settings import SettingsError, get_settings
from worker.store.companies import CompanyRegistry
from worker.store.history import HistoryWriter, settings_url

__all__ = ["SEND_TASK", "app"]

app = app_for(get_settings())

_mover: Mover | None = None
_dispatcher: Dispatcher | None = None
_liveness: Liveness | None = None


def liveness() -> Liveness:
    """This worker process's heartbeat and held messages (worker/delivery/mover.py), made on first
    use.
    """
    global _liveness
    if _liveness is None:
        runtime = get_runtime()
        _liveness = Liveness(
            runtime.redis, runtime.worker_name, grace_ms=runtime.store.publish_grace_ms
        )
    return _liveness


def _message_ids(args: Any) -> list[str]:
    # A send task's arguments are envelopes ({"id": ..., "gen": ..., "req": ...}); anything else
    # (a malformed task) holds nothing worth taking over.
    if not isinstance(args, list | tuple):
        return []
    return [
        item["id"] for item in args if isinstance(item, dict) and isinstance(item.get("id"), str)
    ]


@signals.setup_logging.connect
def _setup_logging(loglevel: int | str | None = None, **_: object) -> None:
    # Connecting here makes Celery leave logging to us: its own lines (``celery.*``) reach the
    # root handler and come out as JSON like ours. NOTIFY_LOG_LEVEL wins over --loglevel.
    configure_from_settings(get_settings(), default_level=loglevel or "INFO")


@signals.worker_init.connect
def _init_sentry(**_: object) -> None:
    init_sentry(get_settings())


@signals.worker_init.connect
def _init_tracing(**_: object) -> None:
    # On only when the OTEL_* variables name an exporter (worker/ops/tracing.py); a threads
    # pool, so the main process's set-up serves every task (no fork after it).
    instrument_celery()


@signals.worker_init.connect
def _check_configuration(**_: object) -> None:
    # Fail at start-up, in one line, rather than on the first message. Building the provider
    # checks the credentials' settings; an OAuth token is fetched on first use, so a token
    # endpoint that is down at start-up delays messages instead of stopping the worker.
    try:
        get_runtime().tokens  # noqa: B018
    except SettingsError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


@signals.worker_ready.connect
def _start_mover(**_: object) -> None:
    global _mover
    runtime = get_runtime()
    _mover = Mover(runtime.store, runtime.publisher, runtime.settings.retry_poll_interval_seconds)
    _mover.start()
    liveness().start()


@signals.worker_ready.connect
def _start_dispatcher(**_: object) -> None:
    # Every worker runs one, with NOTIFY_DISPATCH=fifo too: lanes left from a fair spell drain.
    global _dispatcher
    runtime = get_runtime()
    _dispatcher = Dispatcher(
        runtime.store,
        runtime.publisher,
        CompanyRegistry.from_settings(runtime.redis, runtime.settings),
        DispatchPolicy.from_settings(runtime.settings),
        paused_geolocations=OpenBreakers(runtime.breakers),
    )
    _dispatcher.start()


_history: HistoryWriter | None = None


@signals.worker_ready.connect
def _start_history_writer(**_: object) -> None:
    # NOTIFY_HISTORY_URL set: this worker also drains the history outbox into PostgreSQL.
    global _history
    runtime = get_runtime()
    url = settings_url(runtime.settings)
    if url is None:
        return
    _history = HistoryWriter(
        runtime.redis,
        url,
        consumer=runtime.worker_name,
        keep_days=runtime.settings.history_days,
        batch_size=runtime.settings.history_batch_size,
        claim_idle_seconds=runtime.settings.history_claim_idle_seconds,
    )
    _history.start()


@signals.worker_shutdown.connect
def _flush_spans(**_: object) -> None:
    # The spans of the last tasks, before the process exits (nothing when tracing is off).
    flush()


@signals.worker_shutdown.connect
def _stop_history_writer(**_: object) -> None:
    global _history
    if _history is not None:
        _history.stop()
        _history = None


@signals.task_received.connect
def _hold(request: Any = None, **_: object) -> None:
    # Prefetched or about to run: if this process dies now, another worker takes these over.
    if request is not None and getattr(request, "name", None) == SEND_TASK:
        liveness().hold(_message_ids(getattr(request, "args", None)))


@signals.task_postrun.connect
def _release(sender: Any = None, args: Any = None, **_: object) -> None:
    if getattr(sender, "name", None) == SEND_TASK:
        liveness().release(_message_ids(args))


@signals.worker_shutdown.connect
def _stop_mover(**_: object) -> None:
    global _mover, _liveness, _dispatcher
    if _dispatcher is not None:
        _dispatcher.stop()
        _dispatcher = None
    if _mover is not None:
        _mover.stop()
        _mover = None
    if _liveness is not None:
        _liveness.stop()
        _liveness = None
