"""The Celery configuration: how send tasks travel through the broker, and the app that sends them.

Settings chosen for an I/O-bound, must-not-lose workload on Redis:

* late acks and reject-on-worker-lost: a message is acknowledged only after its outcome (delivered,
  retry scheduled, or dead letter) is written to Redis;
* a threads pool (one shared HTTP client per process, many posts in flight) with a small
  prefetch multiplier, since each message mostly waits on the network;
* JSON only, no result backend (outcomes live in our own status records);
* task events on, so Flower sees tasks from the moment they are sent.

This module builds apps and holds no process state of its own beyond the one app per broker
(``app_for``), so ``worker.runtime`` (which publishes) and ``worker.celery_app`` (the worker
process's app and its start-up and shut-down hooks) both import it and not each other.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from worker.settings import Settings

SEND_TASK = "tasks.send_message"
# Outcome webhooks (worker/webhooks/): a task per event, on a queue of their own.
WEBHOOK_TASK = "tasks.send_webhook"


def webhook_queue(settings: Settings) -> str:
    """The queue of the webhook tasks: ``<NOTIFY_QUEUE_NAME>.webhooks``; every worker consumes it
    beside its own (``worker.celery_app``)."""
    return f"{settings.queue_name}.webhooks"


def make_app(settings: Settings) -> Celery:
    """Build the Celery app from the settings."""
    app = Celery("worker", broker=settings.celery_broker_url, include=["tasks"])
    app.conf.update(
        task_default_queue=settings.queue_name,
        task_routes={
            SEND_TASK: {"queue": settings.queue_name},
            WEBHOOK_TASK: {"queue": webhook_queue(settings)},
        },
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
        # dead-letters the message first and reconnects (worker/delivery/consumer.py).
        worker_consumer="worker.delivery.consumer:DeadLetteringConsumer",
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
            # The webhook queue (``webhook_queue``) is made when first used: quorum too.
            "task_create_missing_queue_type": "quorum",
            "task_default_exchange_type": "topic",
            "worker_detect_quorum_queues": True,
            "broker_transport_options": {"confirm_publish": True},
        }
    options: dict[str, Any] = {"visibility_timeout": settings.visibility_timeout_seconds}
    # kombu's Redis transport, surviving a Redis restart (worker/queue/broker.py); rediss:// too.
    transport = "worker.queue.broker:Transport"
    if settings.uses_sentinel and not settings.broker_url:
        transport = "worker.queue.broker:SentinelTransport"
        secret = settings.redis_sentinel_password
        options["master_name"] = settings.redis_sentinel_master
        options["sentinel_kwargs"] = {
            "password": secret.get_secret_value() if secret else None,
            "socket_connect_timeout": 2,
            "socket_timeout": 2,
        }
    return {"broker_transport": transport, "broker_transport_options": options}


_apps: dict[str, Celery] = {}


def app_for(settings: Settings) -> Celery:
    """The process's one Celery app for this broker, made on first use.

    The worker process's own app (``worker.celery_app.app``) is the one for its settings, so a
    runtime publishing to the same broker reuses its connections and producer pool instead of
    opening a second set.
    """
    url = settings.celery_broker_url
    app = _apps.get(url)
    if app is None:
        app = _apps.setdefault(url, make_app(settings))
    return app
