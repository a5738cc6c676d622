"""The producer helpers partners call: validate, record, queue.

``enqueue`` validates before it queues (raising ``InvalidRequest``, queuing nothing) and returns
the message id; sending the same (user, session, template) again for the same partner returns
the same id and queues nothing new. ``tasks`` re-exports these beside the Celery task, so
``tasks.enqueue`` is the name partners use; the HTTP service and the CLI call them from here, so
nothing in ``worker`` imports ``tasks``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from worker.queue.envelopes import Envelope
from worker.rules.validation import validate
from worker.runtime import Runtime, get_runtime
from worker.shapes.models import Message, request_body


@dataclass(frozen=True, slots=True)
class Enqueued:
    """The result of submitting one request."""

    id: str
    duplicate: bool  # True: the same request was submitted before; nothing new was queued
    state: str


def submit(
    user_id: str,
    body: dict[str, Any],
    *,
    runtime: Runtime | None = None,
    partner: str | None = None,
) -> Enqueued:
    """Validate a v4 request body for ``user_id`` and queue it; raise ``InvalidRequest``.

    ``partner`` (``default`` when None) is part of the id and the idempotency key.
    """
    rt = runtime or get_runtime()
    message = validate(user_id, body, rt.allowlist, partner=partner)
    [(created, state)] = record([message], runtime=rt)
    return Enqueued(message.id, not created, state)


def record(
    messages: Sequence[Message], *, runtime: Runtime | None = None
) -> list[tuple[bool, str]]:
    """Record validated messages in one round trip; the new ones wait in their lanes for the
    dispatcher (``NOTIFY_DISPATCH=fair``) or go to the publisher (``fifo``).

    Returns ``(created, state)`` per message; a duplicate is not published again. The HTTP
    gateway calls this for each group of requests (``worker.intake.intake``), ``submit`` for one.
    """
    rt = runtime or get_runtime()
    results = rt.store.create_many([(message.id, message.to_wire()) for message in messages])
    if rt.store.laned:
        return results
    rt.publish(
        [
            Envelope(message.id, 1, message.to_wire())
            for message, (created, _state) in zip(messages, results, strict=True)
            if created
        ]
    )
    return results


def enqueue(
    user_id: str,
    session_id: str,
    template_id: str,
    url: str | None = None,
    *,
    runtime: Runtime | None = None,
    partner: str | None = None,
) -> str:
    """Queue one message to a Concur user and return its id; raise ``InvalidRequest`` if bad.

    It returns once the message is recorded in Redis; a worker's dispatcher (or, with
    ``NOTIFY_DISPATCH=fifo``, a background thread here) puts it on the queue moments later.
    ``partner`` names who sends it
    (``default``
    when None): the same request from two partners is two messages with two ids.
    """
    body = request_body(session_id, template_id, url)
    return submit(user_id, body, runtime=runtime, partner=partner).id


def enqueue_many(
    requests: list[tuple[str, str, str, str | None]],
    *,
    runtime: Runtime | None = None,
    partner: str | None = None,
) -> list[str]:
    """Queue many ``(user_id, session_id, template_id, url)`` at once; all-or-nothing validation.

    One Redis round trip records them all and they travel in tasks of ``NOTIFY_BATCH_SIZE``
    messages, so a producer with a batch pays per batch much of what ``enqueue`` pays per
    message, and so do the workers. Like ``enqueue``, it returns once they are recorded; the
    dispatcher (or, with ``NOTIFY_DISPATCH=fifo``, the publisher) queues them moments later.
    """
    rt = runtime or get_runtime()
    messages = []
    for user_id, session_id, template_id, url in requests:
        body = request_body(session_id, template_id, url)
        messages.append(validate(user_id, body, rt.allowlist, partner=partner))
    record(messages, runtime=rt)
    return [message.id for message in messages]
