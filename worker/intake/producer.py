"""The producer helpers partners call: validate, record, queue.

``enqueue`` validates before it queues (raising ``InvalidRequest``, queuing nothing) and returns
the message id; sending the same request (user, session, template, URL) again for the same
partner and company returns the same id and queues nothing new (the implicit rule). With
``idempotency_key=`` the key decides instead: the same key and request give the same id and queue
nothing; the same key with another request within NOTIFY_IDEMPOTENCY_WINDOW_SECONDS raises
``IdempotencyConflict`` (its ``existing_id``) and queues nothing. ``expires_at=`` (a datetime with
a time zone; else the partner's default, NOTIFY_PARTNER_EXPIRY_SECONDS) is the message's deadline:
past it, it is never posted and becomes a dead letter ``expired``. A message names its Concur
company with ``company=`` (a company UUID of the registry; None: the default company, the
settings' own): an unknown or disconnected company is refused here (``admit``), before anything
is recorded.
``tasks`` re-exports these beside the Celery task, so ``tasks.enqueue`` is the name partners use;
the HTTP service and the CLI call them from here, so nothing in ``worker`` imports ``tasks``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from worker.intake.intake import Recorded
from worker.ops.tracing import enqueue_span
from worker.queue.envelopes import Envelope
from worker.rules import deadlines
from worker.rules.grants import admission_problem
from worker.rules.validation import InvalidRequest, Problem, validate
from worker.runtime import Runtime, get_runtime
from worker.shapes.models import (
    DEFAULT_COMPANY,
    Message,
    idempotency_digest,
    is_idempotency_key,
    request_body,
)
from worker.store import keys
from worker.store.codec import now_ms
from worker.store.companies import company_states
from worker.store.records import KeyConflict, NewRecord

INVALID_IDEMPOTENCY_KEY = "INVALID_IDEMPOTENCY_KEY"


class IdempotencyConflict(ValueError):
    """The idempotency key was used for another request within its window: nothing was
    queued; ``existing_id`` is the message the first request made."""

    def __init__(self, existing_id: str) -> None:
        self.existing_id = existing_id
        super().__init__(
            f"this idempotency key was used for another request (message {existing_id})"
        )


@dataclass(frozen=True, slots=True)
class Enqueued:
    """The result of submitting one request."""

    id: str
    duplicate: bool  # True: the same request was submitted before; nothing new was queued
    state: str


def prepare(
    message: Message,
    *,
    runtime: Runtime | None = None,
    expires_ms: int | None = None,
    idempotency_key: str | None = None,
) -> Message:
    """A validated message with its deadline (``expires_ms``, the caller's; else the partner's
    default, or none) and its explicit idempotency key; raise ``InvalidRequest`` for a deadline
    already passed or a key that is not 1-255 visible ASCII characters."""
    rt = runtime or get_runtime()
    now = now_ms()
    problems: list[Problem] = []
    if expires_ms is not None:
        late = deadlines.future_deadline(expires_ms, now_ms=now)
        if late is not None:
            problems.append(late)
    if idempotency_key is not None and not is_idempotency_key(idempotency_key):
        problems.append(
            Problem(
                "idempotencyKey",
                INVALID_IDEMPOTENCY_KEY,
                "an idempotency key must be 1 to 255 visible ASCII characters",
            )
        )
    if problems:
        raise InvalidRequest(problems)
    deadline = expires_ms
    if deadline is None:
        deadline = deadlines.default_deadline(
            message.partner, rt.settings.partner_expiry_seconds, now_ms=now
        )
    message = message.expiring(deadline)
    # The fingerprint holds the deadline the caller gave, not a default made of the time now:
    # a repeat of the same request a minute later is the same request.
    return message if idempotency_key is None else message.keyed(idempotency_key, expires_ms)


def deadline_ms(expires_at: datetime | None) -> int | None:
    """``expires_at`` as epoch ms (None: none); raise ``InvalidRequest`` without a time zone."""
    if expires_at is None:
        return None
    deadline = deadlines.deadline_of(expires_at)
    if isinstance(deadline, Problem):
        raise InvalidRequest([deadline])
    return deadline


def submit(
    user_id: str,
    body: dict[str, Any],
    *,
    runtime: Runtime | None = None,
    partner: str | None = None,
    company: str | None = None,
    expires_at: datetime | None = None,
    idempotency_key: str | None = None,
) -> Enqueued:
    """Validate a v4 request body for ``user_id`` and queue it; raise ``InvalidRequest``, or
    ``IdempotencyConflict`` when ``idempotency_key`` was used for another request.

    ``partner`` and ``company`` (``default`` when None) are part of the id and the idempotency
    key; the company must be in the registry and not disconnected.
    """
    rt = runtime or get_runtime()
    message = validate(user_id, body, rt.allowlist, partner=partner, company=company)
    message = prepare(
        message,
        runtime=rt,
        expires_ms=deadline_ms(expires_at),
        idempotency_key=idempotency_key,
    )
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
) -> list[Recorded | InvalidRequest | IdempotencyConflict]:
    """``admit`` then ``record`` a group of separate requests (the gateway's intake groups,
    ``worker.intake.intake``): each message gets its own answer, recorded or refused."""
    rt = runtime or get_runtime()
    problems = admit(messages, runtime=rt)
    admitted = [message for message, problem in zip(messages, problems, strict=True) if not problem]
    results = iter(record_each(admitted, runtime=rt) if admitted else [])
    return [next(results) if problem is None else InvalidRequest([problem]) for problem in problems]


def record(messages: Sequence[Message], *, runtime: Runtime | None = None) -> list[Recorded]:
    """Record validated, admitted messages in one round trip; the new ones wait in their lanes
    for the dispatcher (``NOTIFY_DISPATCH=fair``) or go to the publisher (``fifo``).

    Returns ``(created, state)`` per message; a duplicate is not published again. The HTTP
    gateway calls this for each group of requests (through ``record_admitted``), ``submit`` for
    one. A message whose explicit idempotency key was used for another request is not recorded:
    ``IdempotencyConflict`` is raised for the first such once the others are recorded.
    """
    results = record_each(messages, runtime=runtime)
    for result in results:
        if isinstance(result, IdempotencyConflict):
            raise result
    return [result for result in results if not isinstance(result, IdempotencyConflict)]


def record_each(
    messages: Sequence[Message], *, runtime: Runtime | None = None
) -> list[Recorded | IdempotencyConflict]:
    """``record``, with each message's answer of its own: ``(created, state)``, or the
    ``IdempotencyConflict`` that refused it alone."""
    rt = runtime or get_runtime()
    window = rt.settings.idempotency_window
    results = rt.store.create_each(
        [(message.id, message.to_wire()) for message in messages],
        [_new_record(message, window) for message in messages],
    )
    answers: list[Recorded | IdempotencyConflict] = [
        IdempotencyConflict(result.existing_id) if isinstance(result, KeyConflict) else result
        for result in results
    ]
    if rt.store.laned:
        return answers
    rt.publish(
        [
            Envelope(message.id, 1, message.to_wire(), message.trace)
            for message, answer in zip(messages, answers, strict=True)
            if isinstance(answer, tuple) and answer[0]
        ]
    )
    return answers


def _new_record(message: Message, window_seconds: int) -> NewRecord | None:
    # What the record holds beside the request: the deadline, the explicit key (per partner).
    if message.expires_ms is None and message.idempotency_key is None:
        return None
    if message.idempotency_key is None:
        return NewRecord(expires_ms=message.expires_ms)
    return NewRecord(
        expires_ms=message.expires_ms,
        idempotency_key=keys.idempotency(
            message.partner, idempotency_digest(message.idempotency_key)
        ),
        fingerprint=message.fingerprint or "",
        window_seconds=window_seconds,
    )


def submit_many(
    requests: Sequence[tuple[Any, Any]],
    *,
    runtime: Runtime | None = None,
    partner: str | None = None,
    company: str | None = None,
    expires_ms: int | None = None,
) -> list[Enqueued | InvalidRequest]:
    """Validate each ``(user_id, v4 body)`` on its own and queue the valid ones: the gateway's
    bulk intake (``POST /messages/batch``). ``expires_ms`` is every message's deadline (None:
    the partner's default, or none), as ``prepare`` gives one message.

    Answers in order, per request, its ``Enqueued`` or the ``InvalidRequest`` that refused it
    alone (nothing of it is recorded). The valid ones then take ``enqueue_many``'s path: their
    company (one for all) admitted once, and all of them recorded in one Redis round trip. A
    company unknown or disconnected raises ``InvalidRequest`` for the whole batch, recording
    nothing. The same request twice in one batch is one message: the second is a duplicate.
    """
    rt = runtime or get_runtime()
    outcomes: list[Message | InvalidRequest] = []
    for user_id, body in requests:
        try:
            message = validate(user_id, body, rt.allowlist, partner=partner, company=company)
            outcomes.append(prepare(message, runtime=rt, expires_ms=expires_ms))
        except InvalidRequest as refused:
            outcomes.append(refused)
    valid = [outcome for outcome in outcomes if isinstance(outcome, Message)]
    recorded: list[Recorded] = []
    if valid:
        with enqueue_span(len(valid)) as trace:
            if trace is not None:  # one span for the request: each message carries it
                valid = [dataclasses.replace(message, trace=trace) for message in valid]
            _refuse_unadmitted(valid, rt)
            recorded = record(valid, runtime=rt)
    results = iter(recorded)
    answers: list[Enqueued | InvalidRequest] = []
    for outcome in outcomes:
        if isinstance(outcome, InvalidRequest):
            answers.append(outcome)
        else:
            created, state = next(results)
            answers.append(Enqueued(outcome.id, not created, state))
    return answers


def enqueue(
    user_id: str,
    session_id: str,
    template_id: str,
    url: str | None = None,
    *,
    runtime: Runtime | None = None,
    partner: str | None = None,
    company: str | None = None,
    expires_at: datetime | None = None,
    idempotency_key: str | None = None,
) -> str:
    """Queue one message to a Concur user and return its id; raise ``InvalidRequest`` if bad.

    It returns once the message is recorded in Redis; a worker's dispatcher (or, with
    ``NOTIFY_DISPATCH=fifo``, a background thread here) puts it on the queue moments later.
    ``partner`` names who sends it (``default`` when None): the same request from two partners
    is two messages with two ids. ``company`` names the Concur company of the user (a company
    UUID of the registry; None: the default company); an unknown or disconnected company raises
    ``InvalidRequest``. ``expires_at`` (a datetime with a time zone, still ahead) is its deadline;
    ``idempotency_key`` makes the key, not the request, say what "the same message" is (another
    request under a key already used raises ``IdempotencyConflict``).
    """
    body = request_body(session_id, template_id, url)
    return submit(
        user_id,
        body,
        runtime=runtime,
        partner=partner,
        company=company,
        expires_at=expires_at,
        idempotency_key=idempotency_key,
    ).id


Row = tuple[str, str, str, str | None] | tuple[str, str, str, str | None, str | None]


def enqueue_many(
    requests: Sequence[Row],
    *,
    runtime: Runtime | None = None,
    partner: str | None = None,
    company: str | None = None,
    expires_at: datetime | None = None,
) -> list[str]:
    """Queue many ``(user_id, session_id, template_id, url)`` at once; all-or-nothing validation.

    One Redis round trip records them all and they travel in tasks of ``NOTIFY_BATCH_SIZE``
    messages, so a producer with a batch pays per batch much of what ``enqueue`` pays per
    message, and so do the workers. Like ``enqueue``, it returns once they are recorded; the
    dispatcher (or, with ``NOTIFY_DISPATCH=fifo``, the publisher) queues them moments later.
    ``company`` (all of them are for it) is checked once for the batch: one more round trip,
    none for the default company. A row may carry a fifth element, its idempotency key (None:
    none); ``expires_at`` is every message's deadline.
    """
    rt = runtime or get_runtime()
    given = deadline_ms(expires_at)
    messages = []
    for row in requests:
        user_id, session_id, template_id, url = row[:4]
        key = row[4] if len(row) > 4 else None
        body = request_body(session_id, template_id, url)
        message = validate(user_id, body, rt.allowlist, partner=partner, company=company)
        messages.append(prepare(message, runtime=rt, expires_ms=given, idempotency_key=key))
    with enqueue_span(len(messages)) as trace:
        if trace is not None:  # one span for the batch: each message carries it
            messages = [dataclasses.replace(message, trace=trace) for message in messages]
        _refuse_unadmitted(messages, rt)
        record(messages, runtime=rt)
    return [message.id for message in messages]
