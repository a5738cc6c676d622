"""The worker process's Celery app (``celery -A worker worker`` finds it as ``worker.app``).

The app is configured in ``worker.queue.config``; this module connects what a worker process
starts and stops around it: logging, Sentry, the configuration check, the mover and liveness
threads, the history writer, and the held-message bookkeeping for each received task.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from typing import Any

from celery import signals

from worker.delivery.dispatcher import Dispatcher, DispatchPolicy, OpenBreakers
from worker.delivery.mover import Liveness, Mover
from worker.limits.inflight import InFlightGauge
from worker.ops.logs import configure_from_settings
from worker.ops.monitoring import init_sentry
from worker.ops.tracing import flush, instrument_celery
from worker.queue import broker
from worker.queue.config import SEND_TASK, WEBHOOK_TASK, app_for, webhook_queue
from worker.rules.retries import RedisPatience
from worker.runtime import Runtime, get_runtime
from worker.settings import SettingsError, get_settings
from worker.store import history_process, keys
from worker.store.companies import CompanyRegistry
from worker.store.history import settings_url
from worker.store.redisclient import make_redis
from worker.store.webhooks import WebhookStore
from worker.webhooks.delivery import WebhookMover

__all__ = ["SEND_TASK", "WEBHOOK_TASK", "app"]

app = app_for(get_settings())

_mover: Mover | None = None
_gauge: InFlightGauge | None = None
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
            runtime.redis,
            runtime.worker_name,
            grace_ms=runtime.store.publish_grace_ms,
            store=runtime.store,
            oldest_task=_oldest_task_reader(runtime),
        )
    return _liveness


def _oldest_task_reader(runtime: Runtime) -> Callable[[], str | bytes | None] | None:
    # kombu's Redis transport keeps a queue's tasks in a list of the queue's name, pushed on the
    # left and popped on the right: the oldest is the last. RabbitMQ has no such list (nor the
    # window the reader serves: it hands a dead consumer's tasks to another itself).
    settings = runtime.settings
    if settings.broker_is_amqp:
        return None
    broker = runtime.redis
    if settings.broker_url is not None:  # a Redis of its own for the broker
        broker = make_redis(settings.broker_url, patience=RedisPatience.from_settings(settings))
    queue = settings.queue_name
    return lambda: broker.lindex(queue, -1)


def _message_ids(args: Any) -> list[str]:
    # A send task's arguments are envelopes ({"id": ..., "gen": ..., "req": ...}); anything else
    # (a malformed task) holds nothing worth taking over.
    if not isinstance(args, list | tuple):
        return []
    return [
        item["id"] for item in args if isinstance(item, dict) and isinstance(item.get("id"), str)
    ]


def _body_args(body: Any) -> Any:
    # A send task's body (Celery's protocol 2): [args, kwargs, embed].
    try:
        decoded = json.loads(body)
    except (TypeError, ValueError, RecursionError):
        return None  # not a task: the consumer dead-letters it
    return decoded[0] if isinstance(decoded, list) and decoded else None


def _note_received(pipe: Any, message: Any) -> None:
    # In the MULTI that puts the task in kombu's ``unacked`` (worker/queue/broker.py): the two
    # cannot be parted by a SIGKILL.
    headers = getattr(message, "headers", None)
    if not isinstance(headers, dict) or headers.get("task") != SEND_TASK:
        return
    ids = _message_ids(_body_args(getattr(message, "body", None)))
    if ids:
        pipe.sadd(keys.held(get_runtime().worker_name), *ids)


@signals.worker_init.connect
def _hold_on_receipt(**_: object) -> None:
    settings = get_settings()
    # Only where the broker is the Redis the held sets live in (NOTIFY_BROKER_URL unset);
    # otherwise ``_hold`` notes them when Celery has the task.
    if settings.broker_url is None:
        broker.on_receipt(_note_received)


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
    global _gauge
    _gauge = InFlightGauge(runtime.redis, runtime.worker_name, runtime.in_flight)
    _gauge.start()


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


_history: subprocess.Popen[bytes] | None = None


@signals.worker_ready.connect
def _start_history_writer(**_: object) -> None:
    # NOTIFY_HISTORY_URL set: a process beside this worker drains the history outbox into
    # PostgreSQL (worker/store/history_process.py: why not a thread of this one).
    global _history
    runtime = get_runtime()
    if settings_url(runtime.settings) is None:
        return
    _history = history_process.spawn(runtime.settings, consumer=runtime.worker_name)


@signals.worker_shutdown.connect
def _flush_spans(**_: object) -> None:
    # The spans of the last tasks, before the process exits (nothing when tracing is off).
    flush()


@signals.worker_shutdown.connect
def _stop_history_writer(**_: object) -> None:
    global _history
    if _history is not None:
        history_process.stop(_history)
        _history = None


@signals.task_received.connect
def _hold(request: Any = None, **_: object) -> None:
    # Prefetched or about to run: if this process dies now, another worker takes these over.
    # Noted already when kombu received the task (``_note_received``), where it can be.
    if broker.receipt_hook() is not None:
        return
    if request is not None and getattr(request, "name", None) == SEND_TASK:
        liveness().hold(_message_ids(getattr(request, "args", None)))


@signals.task_postrun.connect
def _release(sender: Any = None, args: Any = None, **_: object) -> None:
    if getattr(sender, "name", None) == SEND_TASK:
        liveness().release(_message_ids(args))


@signals.worker_shutdown.connect
def _stop_mover(**_: object) -> None:
    global _mover, _liveness, _dispatcher, _gauge
    if _gauge is not None:
        _gauge.stop()
        _gauge = None
    if _dispatcher is not None:
        _dispatcher.stop()
        _dispatcher = None
    if _mover is not None:
        _mover.stop()
        _mover = None
    if _liveness is not None:
        _liveness.stop()
        _liveness = None


# -- outcome webhooks (worker/webhooks/) -------------------------------------------------------

_webhook_mover: WebhookMover | None = None


@signals.celeryd_after_setup.connect
def _consume_webhooks(instance: Any = None, **_: object) -> None:
    # Every worker also consumes the webhook queue: events need no process of their own, and
    # their queue keeps them from waiting behind (or holding up) the send tasks.
    if instance is not None:
        instance.app.amqp.queues.select_add(webhook_queue(get_settings()))


@signals.worker_ready.connect
def _start_webhook_mover(**_: object) -> None:
    global _webhook_mover
    runtime = get_runtime()
    queue = webhook_queue(runtime.settings)

    def publish(event_ids: Any) -> None:
        for event_id in event_ids:
            runtime.celery.send_task(WEBHOOK_TASK, args=[event_id], queue=queue)

    _webhook_mover = WebhookMover(
        WebhookStore.from_settings(runtime.redis, runtime.settings),
        publish,
        runtime.settings.retry_poll_interval_seconds,
        grace_ms=runtime.store.publish_grace_ms,
    )
    _webhook_mover.start()


@signals.worker_shutdown.connect
def _stop_webhook_mover(**_: object) -> None:
    global _webhook_mover
    if _webhook_mover is not None:
        _webhook_mover.stop()
        _webhook_mover = None
