"""The ``send_message`` task, and the producer helpers partners call (``worker.intake.producer``).

``enqueue`` validates before it queues (raising ``InvalidRequest``, queuing nothing) and returns
the message id; sending the same request (user, session, template, URL) again for the same
partner and company (``company=``: a company UUID of the registry; the default company when
absent) returns the same id and queues nothing new. ``idempotency_key=`` makes a key of the
caller's say what "the same message" is (another request under a key already used raises
``IdempotencyConflict``); ``expires_at=`` (a datetime with a time zone) is its deadline.
"""

from __future__ import annotations

from typing import Any

from celery import Task

from worker.celery_app import SEND_TASK, WEBHOOK_TASK, app
from worker.delivery.attempts import deliver_task
from worker.intake.producer import (
    Enqueued,
    IdempotencyConflict,
    enqueue,
    enqueue_many,
    record,
    submit,
)
from worker.rules.validation import InvalidRequest, Problem
from worker.runtime import get_runtime
from worker.webhooks.delivery import get_delivery

__all__ = [
    "Enqueued",
    "IdempotencyConflict",
    "InvalidRequest",
    "Problem",
    "enqueue",
    "enqueue_many",
    "record",
    "send_message",
    "send_webhook",
    "submit",
]


@app.task(name=SEND_TASK, bind=True, acks_late=True, ignore_result=True)
def send_message(self: Task, *args: Any, **kwargs: Any) -> str:
    """Attempt delivery of one message (see ``worker.delivery.attempts``).

    Takes ``*args, **kwargs`` on purpose: a malformed task must reach our code and be
    dead-lettered, not fail in Celery's argument check before we can see it.
    """
    return deliver_task(
        args,
        kwargs,
        parts=get_runtime(),
        task_id=self.request.id or "",
        stopping=_worker_is_stopping,
    )


def _worker_is_stopping() -> bool:
    # Celery sets this on a warm shutdown (SIGTERM); 0 (EX_OK) is a value, not "unset".
    from celery.worker import state

    return state.should_stop is not None and state.should_stop is not False


@app.task(name=WEBHOOK_TASK, ignore_result=True)
def send_webhook(event_id: Any = None, *_: Any, **__: Any) -> str:
    """Attempt one outcome event for a partner's endpoint (``worker.webhooks.delivery``).

    Not acked late: the event waits in Redis (``keys.WEBHOOK_SCHEDULE``) until its outcome is
    written, and the webhook mover publishes it again if this task is lost.
    """
    if not isinstance(event_id, str):
        return "skipped"
    return get_delivery().attempt(event_id)
