"""The producer helpers partners call: validate, record, queue.

``enqueue`` validates before it queues (raising ``InvalidRequest``, queuing nothing) and returns
the message id; sending the same (user, session, template) again for the same partner and
company returns the same id and queues nothing new. A message names its Concur company with
``company=`` (a company UUID of the registry; None: the default company, the settings' own):
an unknown or disconnected company is refused here (``admit``), before anything is recorded.
``tasks`` re-exports these beside the Celery task, so ``tasks.enqueue`` is the name partners use;
the HTTP service and the CLI call them from here, so nothing in ``worker`` imports ``tasks``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from worker.intake.intake import Recorded
from worker.ops.tracing import enqueue_span
from worker.queue.envelopes import Envelope
from worker.rules.grants import admission_problem
from worker.rules.validation import InvalidRequest, Problem, validate
from worker.runtime import Runtime, get_runtime
from worker.shapes.models import DEFAULT_COMPANY, Message, request_body
from worker.store.companies import company_states


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
    company: str | None = None,
) -> Enqueued:
    """Validate a v4 request body for ``user_id`` and queue it; raise ``InvalidRequest``.

    ``partner`` and ``company`` (``default`` when None) are part of the id and the idempotency
    key; the company must be in the registry and not disconnected.
    """
    rt = runtime or get_runtime()
    message = validate(user_id, body, rt.allowlist, partner=partner, company=company)
    with enqueue_span(1, message.id) as trace:
        if trace is not None:  # tracing on: the message carries its producer's span
            message = dataclasses.replace(message, trace=trace)
        _refuse_unadmitted([message], rt)
        [(created, state)] = record([message], runtime=rt)
    return Enqueued(message.id, not created, state)


def admit(messages: Sequence[Message], *, runtime: Runtime | None = None) -> list[Problem | None]:
    """Why each message cannot be accepted now (its company unknown to the registry, or
    disconnected), or None when it can (``worker.rules.grants.admission_problem``).

    One pipelined round trip reads the states of the distinct companies the messages name; none
    when they all go to the default company. A company disconnected between this check and the
    record is the worker's to settle (its messages become dead letters ``company_disconnected``).
    """
    companies = [message.company for message in messages if message.company != DEFAULT_COMPANY]
    if not companies:
        return [None] * len(messages)
    rt = runtime or get_runtime()
    states = company_states(rt.redis, companies)
    return [admission_problem(message.company, states.get(message.company)) for message in messages]


def _refuse_unadmitted(messages: Sequence[Message], rt: Runtime) -> None:
    # All or nothing: one problem per company refused, however many messages name it.
    problems = [problem for problem in admit(messages, runtime=rt) if problem is not None]
    if problems:
        raise InvalidRequest(list(dict.fromkeys(problems)))


def record_admitted(
    messages: Sequence[Message], *, runtime: Runtime | None = None
) -> list[Recorded | InvalidRequest]:
    """``admit`` then ``record`` a group of separate requests (the gateway's intake groups,
    ``worker.intake.intake``): each message gets its own answer, recorded or refused."""
    rt = runtime or get_runtime()
    problems = admit(messages, runtime=rt)
    admitted = [message for message, problem in zip(messages, problems, strict=True) if not problem]
    results = iter(record(admitted, runtime=rt) if admitted else [])
    return [next(results) if problem is None else InvalidRequest([problem]) for problem in problems]


def record(messages: Sequence[Message], *, runtime: Runtime | None = None) -> list[Recorded]:
    """Record validated, admitted messages in one round trip; the new ones wait in their lanes
    for the dispatcher (``NOTIFY_DISPATCH=fair``) or go to the publisher (``fifo``).

    Returns ``(created, state)`` per message; a duplicate is not published again. The HTTP
    gateway calls this for each group of requests (through ``record_admitted``), ``submit`` for
    one.
    """
    rt = runtime or get_runtime()
    results = rt.store.create_many([(message.id, message.to_wire()) for message in messages])
    if rt.store.laned:
        return results
    rt.publish(
        [
            Envelope(message.id, 1, message.to_wire(), message.trace)
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
    company: str | None = None,
) -> str:
    """Queue one message to a Concur user and return its id; raise ``InvalidRequest`` if bad.

    It returns once the message is recorded in Redis; a worker's dispatcher (or, with
    ``NOTIFY_DISPATCH=fifo``, a background thread here) puts it on the queue moments later.
    ``partner`` names who sends it (``default`` when None): the same request from two partners
    is two messages with two ids. ``company`` names the Concur company of the user (a company
    UUID of the registry; None: the default company); an unknown or disconnected company raises
    ``InvalidRequest``.
    """
    body = request_body(session_id, template_id, url)
    return submit(user_id, body, runtime=runtime, partner=partner, company=company).id


def enqueue_many(
    requests: list[tuple[str, str, str, str | None]],
    *,
    runtime: Runtime | None = None,
    partner: str | None = None,
    company: str | None = None,
) -> list[str]:
    """Queue many ``(user_id, session_id, template_id, url)`` at once; all-or-nothing validation.

    One Redis round trip records them all and they travel in tasks of ``NOTIFY_BATCH_SIZE``
    messages, so a producer with a batch pays per batch much of what ``enqueue`` pays per
    message, and so do the workers. Like ``enqueue``, it returns once they are recorded; the
    dispatcher (or, with ``NOTIFY_DISPATCH=fifo``, the publisher) queues them moments later.
    ``company`` (all of them are for it) is checked once for the batch: one more round trip,
    none for the default company.
    """
    rt = runtime or get_runtime()
    messages = []
    for user_id, session_id, template_id, url in requests:
        body = request_body(session_id, template_id, url)
        messages.append(validate(user_id, body, rt.allowlist, partner=partner, company=company))
    with enqueue_span(len(messages)) as trace:
        if trace is not None:  # one span for the batch: each message carries it
            messages = [dataclasses.replace(message, trace=trace) for message in messages]
        _refuse_unadmitted(messages, rt)
        record(messages, runtime=rt)
    return [message.id for message in messages]
