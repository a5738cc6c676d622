"""The Celery application (``celery -A worker worker`` finds it as ``worker.app``).

Settings chosen for an I/O-bound, must-not-lose workload on Redis:

* late acks and reject-on-worker-lost: a message is acknowledged only after its outcome (delivered,
  retry scheduled, or dead letter) is written to Redis;
* a threads pool (one shared HTTP client per process, many posts in flight) with a small
  prefetch multiplier, since each message mostly waits on the network;
* JSON only, no result backend (outcomes live in our own status records);
* task events on, so Flower sees tasks from the moment they are sent.
"""

from __future__ import annotations

import sys
from typing import Any

from celery import Celery, signals

from worker.history import HistoryWriter, settings_url
from worker.logs import configure_from_settings
from worker.monitoring import init_sentry
from worker.mover import Liveness, Mover
from worker.runtime import get_runtime
from worker.settings import Settings, SettingsError, get_settings

SEND_TASK = "tasks.send_message"


def make_app(settings: Settings) -> Celery:
    """Build the Celery app from the settings."""
    app = Celery("worker", broker=settings.celery_broker_url, include=["tasks"])
    app.conf.update(
        task_default_queue=settings.queue_name,
        task_routes={SEND_TASK: {"queue": settings.queue_name}},
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        task_ignore_result=True,
        result_backend=None,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_pool="threads",
        worker_concurrency=settings.worker_concurrency,
        worker_prefetch_multiplier=settings.worker_prefetch_multiplier,
        worker_send_task_events=True,
        task_send_sent_event=True,
        worker_hijack_root_logger=False,
        broker_connection_retry_on_startup=True,
        worker_enable_remote_control=True,
        # Celery drops a message it cannot decode or run, and exits on a Redis restart; ours
        # dead-letters the message first and reconnects (worker/consumer.py).
        worker_consumer="worker.consumer:DeadLetteringConsumer",
        enable_utc=True,
        **broker_options(settings),
    )
    return app


def broker_options(settings: Settings) -> dict[str, Any]:
    """The broker's part of the Celery configuration: Redis, Redis through Sentinel, RabbitMQ."""
    if settings.broker_is_amqp:
        # RabbitMQ: quorum queues (replicated, Raft) and publisher confirms, without which a
        # publish is not known to have reached the queue (Celery's docs require both). Global
        # QoS is off with quorum queues (worker_detect_quorum_queues), so the prefetch is per
        # consumer, as on Redis. Nothing is sent with a countdown (retries wait in our own
        # schedule in Redis), so Celery's native delayed delivery is never used; the topic
        # exchange is what it needs if it were.
        return {
            "task_default_queue_type": "quorum",
            "task_default_exchange_type": "topic",
            "worker_detect_quorum_queues": True,
            "broker_transport_options": {"confirm_publish": True},
        }
    options: dict[str, Any] = {"visibility_timeout": settings.visibility_timeout_seconds}
    # kombu's Redis transport, surviving a Redis restart (worker/broker.py); rediss:// too.
    transport = "worker.broker:Transport"
    if settings.uses_sentinel and not settings.broker_url:
        transport = "worker.broker:SentinelTransport"
        secret = settings.redis_sentinel_password
        options["master_name"] = settings.redis_sentinel_master
        options["sentinel_kwargs"] = {
            "password": secret.get_secret_value() if secret else None,
            "socket_connect_timeout": 2,
            "socket_timeout": 2,
        }
    return {"broker_transport": transport, "broker_transport_options": options}


app = make_app(get_settings())


_mover: Mover | None = None
_liveness: Liveness | None = None


def liveness() -> Liveness:
    """This worker process's heartbeat and held messages (worker/mover.py), made on first use."""
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
    _mover = Mover(runtime.store, runtime.publish, runtime.settings.retry_poll_interval_seconds)
    _mover.start()
    liveness().start()


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
    global _mover, _liveness
    if _mover is not None:
        _mover.stop()
        _mover = None
    if _liveness is not None:
        _liveness.stop()
        _liveness = None
