"""The worker's Celery consumer: nothing it receives vanishes, and a broker restart is survived.

Broker messages Celery cannot turn into a task are dead-lettered as ``malformed_message``:
Celery's consumer acknowledges and drops a message whose body does not decode (``on_decode_error``)
and rejects, without requeue, one naming an unknown task or with broken headers. Either way the
message would vanish with only a log line. ``DeadLetteringConsumer`` (set as ``worker_consumer``)
first keeps it as a dead letter, so an operator sees it with ``notify failed list``.

When Redis restarts, Celery 5.7 closes the broken connection after ``collect()`` has detached its
transport; kombu's restore of unacknowledged messages on close then fails with an AttributeError
that Celery does not expect, and the worker exits ("Unrecoverable error") instead of
reconnecting. ``DeadLetteringConsumer`` lets it reconnect: the unacknowledged messages stay in
Redis (kombu's ``unacked`` hash), restored after the visibility timeout, and the mover
republishes their messages when their lease or grace period ends.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from celery.worker.consumer import Consumer

from worker.rules import outcomes
from worker.runtime import get_runtime
from worker.shapes.models import MAX_RAW_EXCERPT, malformed_id
from worker.store.codec import Failure

log = logging.getLogger("notify.consumer")


def _text(body: Any) -> str:
    if isinstance(body, bytes | bytearray):
        return bytes(body).decode("utf-8", "backslashreplace")
    if isinstance(body, str):
        return body
    try:
        return json.dumps(body, default=repr, ensure_ascii=False)
    except (TypeError, ValueError):
        return repr(body)


def dead_letter_of(message: Any, detail: str) -> tuple[str, Failure, str]:
    """The dead letter's id, failure and stored request for a message that is no task.

    The id is derived from the raw content (as for a malformed task), so a redelivered copy
    lands on the same dead letter and the message cannot name a record to overwrite.
    """
    raw = _text(getattr(message, "body", b""))[:MAX_RAW_EXCERPT]
    headers = getattr(message, "headers", None)
    headers = headers if isinstance(headers, dict) else {}
    task_id = str(headers.get("id") or "")
    request = json.dumps(
        {
            "raw": raw,
            "task": _text(headers.get("task"))[:200] if "task" in headers else None,
            "contentType": getattr(message, "content_type", None),
        },
        ensure_ascii=False,
    )
    failure = Failure(
        outcomes.MALFORMED_MESSAGE, detail, task_id=task_id, worker=get_runtime().worker_name
    )
    return malformed_id(raw), failure, request


def keep(message: Any, detail: str) -> None:
    """Write the dead letter; raises when Redis cannot take it (the message is then not acked)."""
    ident, failure, request = dead_letter_of(message, detail)
    get_runtime().store.dead_letter(ident, failure, request=request)
    log.warning("dead letter %s: %s", ident, detail)


class DeadLetteringConsumer(Consumer):  # type: ignore[misc]
    """Celery's consumer, except that a message it cannot run is kept as a dead letter first."""

    def on_connection_error_after_connected(self, exc: Exception) -> None:
        """Clean up after a lost broker connection; kombu's restore must not end the worker."""
        try:
            super().on_connection_error_after_connected(exc)
        except AttributeError:
            log.warning(
                "broker connection lost; unacknowledged messages stay in Redis and are restored "
                "after the visibility timeout"
            )

    def on_decode_error(self, message: Any, exc: Exception) -> None:
        """Dead-letter the undecodable body, then let Celery log and acknowledge it."""
        # The exception's text may quote the body; the class name is enough for the detail.
        keep(message, f"the message body cannot be decoded ({type(exc).__name__})")
        super().on_decode_error(message, exc)

    def on_unknown_task(self, body: Any, message: Any, exc: Exception) -> None:
        """Dead-letter a message naming a task this worker does not have, then reject it."""
        keep(message, "the message names a task this worker does not run")
        super().on_unknown_task(body, message, exc)

    def on_invalid_task(self, body: Any, message: Any, exc: Exception) -> None:
        """Dead-letter a message Celery refuses as a task (bad headers), then reject it."""
        keep(message, f"the message is not a valid task ({type(exc).__name__})")
        super().on_invalid_task(body, message, exc)

    def on_unknown_message(self, body: Any, message: Any) -> None:
        """Dead-letter a message in no task format, then reject it."""
        keep(message, "the message is in no task format")
        super().on_unknown_message(body, message)
