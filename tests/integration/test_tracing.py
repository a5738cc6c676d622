"""Tracing across processes: a producer here (spans in the SDK's in-memory exporter) and a real
worker exporting OTLP/HTTP to a loopback receiver (``sandbox.otlp``), joined in one trace."""

from __future__ import annotations

import dataclasses
import json
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from sandbox.otlp import OtlpReceiver, ReceivedSpan
from tests.harness import Isolated, NotifyApi, wait_for
from worker.ops import tracing
from worker.queue.envelopes import Envelope
from worker.shapes.models import Message

URL = "https://app.example.com/x"


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    """The worker's trace backend: an OTLP/HTTP receiver on loopback."""
    running = OtlpReceiver()
    yield running
    running.stop()


@pytest.fixture
def memory() -> Iterator[InMemorySpanExporter]:
    """Tracing on in this process (the producer), into the SDK's in-memory exporter."""
    tracing.shutdown()
    exporter = InMemorySpanExporter()
    assert tracing.setup(exporter=exporter) is not None
    yield exporter
    tracing.shutdown()


def _traced_worker(start_worker, isolated: Isolated, receiver: OtlpReceiver) -> Any:
    return start_worker(
        "traced",
        **isolated.env,
        OTEL_EXPORTER_OTLP_TRACES_ENDPOINT=receiver.endpoint,
        OTEL_BSP_SCHEDULE_DELAY="100",
    )


def _hex(value: int, width: int) -> str:
    return format(value, f"0{width}x")


def _delivered(receiver: OtlpReceiver, message_ids: list[str]) -> dict[str, ReceivedSpan]:
    spans = {
        span.attributes.get("messaging.message.id"): span
        for span in receiver.received()
        if span.name == "notify.deliver" and span.attributes.get("notify.outcome") == "delivered"
    }
    return {mid: spans[mid] for mid in message_ids if mid in spans}


def _ancestry(receiver: OtlpReceiver, leaf: ReceivedSpan, end: str) -> list[ReceivedSpan]:
    """``leaf`` and its ancestors as the receiver holds them, once the walk up reaches ``end``
    (the first parent the worker does not export; "" past a root). Waits for them: a parent ends
    after its child, so the exporter may send it in a later batch than the child."""

    def walk() -> list[ReceivedSpan] | None:
        spans = {s.span_id: s for s in receiver.received() if s.trace_id == leaf.trace_id}
        chain, span_id = [], leaf.span_id
        while span_id in spans:
            chain.append(spans[span_id])
            span_id = spans[span_id].parent_span_id
        return chain if span_id == end else None

    return wait_for(walk, timeout=30, what=f"the ancestors of {leaf.name} up to {end!r}")


def test_a_message_enqueued_here_is_posted_by_a_worker_in_the_same_trace(
    start_worker, isolated: Isolated, receiver: OtlpReceiver, memory: InMemorySpanExporter, user_id
):
    worker = _traced_worker(start_worker, isolated, receiver)
    import tasks

    tracer = tracing.active().tracer  # type: ignore[union-attr]
    with tracer.start_as_current_span("partner.request") as partner:
        message_id = tasks.enqueue(
            user_id, f"s-{uuid.uuid4().hex[:8]}", "welcome", URL, runtime=isolated.runtime
        )
        isolated.runtime.publisher.flush()
    trace_id = _hex(partner.get_span_context().trace_id, 32)
    wait_for(lambda: isolated.state(message_id) == "delivered", timeout=30, what="delivery")
    deliver = wait_for(
        lambda: _delivered(receiver, [message_id]).get(message_id), timeout=30, what="spans"
    )

    here = {_hex(s.context.span_id, 16): s for s in memory.get_finished_spans()}
    [enqueue] = [s for s in here.values() if s.name == "notify.enqueue"]
    assert enqueue.kind == SpanKind.PRODUCER
    assert enqueue.parent is not None
    assert enqueue.parent.span_id == partner.get_span_context().span_id
    assert enqueue.attributes["messaging.message.id"] == message_id
    [send] = [s for s in here.values() if s.name.startswith("send ")]
    assert send.parent is not None and send.parent.span_id == enqueue.context.span_id

    # The worker's spans: the same trace, and their parents lead back to this process's.
    assert deliver.trace_id == trace_id
    chain = [s.name for s in _ancestry(receiver, deliver, _hex(send.context.span_id, 16))]
    assert chain[0] == "notify.deliver" and chain[-1] == "run/tasks.send_message", chain
    theirs = {s.span_id: s for s in receiver.received() if s.trace_id == trace_id}
    assert all(s.service == "notify-worker" for s in theirs.values())

    children = {s.name: s for s in theirs.values() if s.parent_span_id == deliver.span_id}
    assert set(children) == {"notify.claim", "notify.token", "notify.post", "notify.outcome"}
    assert children["notify.claim"].attributes == {"notify.claim": "go", "notify.attempt": 1}
    post = children["notify.post"]
    assert post.attributes["http.response.status_code"] == 200
    record = isolated.runtime.store.status(message_id)
    assert record is not None
    [attempt] = (
        json.loads(record["attempts"])
        if isinstance(record["attempts"], str)
        else record["attempts"]
    )
    assert post.attributes["concur.correlation_id"] == attempt["cid"]
    assert children["notify.outcome"].attributes == {"notify.outcome": "delivered"}

    # The worker's log line of the attempt carries the trace id.
    [line] = [
        json.loads(text)
        for text in worker.log().splitlines()
        if text.startswith("{") and json.loads(text).get("message_id") == message_id
    ]
    assert line["outcome"] == "delivered"
    assert line["trace_id"] == trace_id
    assert line["span_id"] == children["notify.outcome"].span_id


def test_one_task_of_messages_from_two_requests_keeps_each_in_its_own_trace(
    start_worker, isolated: Isolated, receiver: OtlpReceiver, memory: InMemorySpanExporter, user_id
):
    _traced_worker(start_worker, isolated, receiver)
    tracer = tracing.active().tracer  # type: ignore[union-attr]
    runtime = isolated.runtime
    messages, producers = [], []
    for n in range(2):
        with tracer.start_as_current_span(f"request {n}") as span, tracing.enqueue_span() as tp:
            producers.append(span)
            message = Message.create(user_id, f"s-{uuid.uuid4().hex[:8]}", "welcome", URL)
            messages.append(dataclasses.replace(message, trace=tp))
    runtime.store.create_many([(m.id, m.to_wire()) for m in messages])
    # Submitted together, so the publisher sends them as one task.
    runtime.publish([Envelope(m.id, 1, m.to_wire(), m.trace) for m in messages])
    assert runtime.publisher.flush()
    ids = [m.id for m in messages]
    found = wait_for(
        lambda: len(_delivered(receiver, ids)) == 2 and _delivered(receiver, ids),
        timeout=30,
        what="both messages' spans",
    )
    [send] = [s for s in memory.get_finished_spans() if s.name.startswith("send ")]
    assert send.parent is None  # two traces: the task's publish is a root linked to both
    assert {link.context.trace_id for link in send.links} == {
        p.get_span_context().trace_id for p in producers
    }
    # The task's span ends after the deliveries in it: the exporter may send it in a later batch.
    [run] = wait_for(
        lambda: [s for s in receiver.received() if s.name == "run/tasks.send_message"],
        timeout=30,
        what="the task's run span",
    )
    assert run.trace_id == _hex(send.context.trace_id, 32)
    enqueues = {
        _hex(s.context.trace_id, 32): _hex(s.context.span_id, 16)
        for s in memory.get_finished_spans()
        if s.name == "notify.enqueue"
    }
    for message, producer in zip(messages, producers, strict=True):
        deliver = found[message.id]
        trace_id = _hex(producer.get_span_context().trace_id, 32)
        assert deliver.trace_id == trace_id  # its own request's trace, not the task's
        assert deliver.parent_span_id == enqueues[trace_id]
        assert deliver.links == [(run.trace_id, run.span_id)]


def test_a_gateway_request_is_traced_through_the_worker_to_the_post(
    start_worker, isolated: Isolated, receiver: OtlpReceiver, user_id, tmp_path
):
    """Three processes: the partner (this test, its span only named by the header it sends),
    ``notify api`` and a worker, the last two exporting to the receiver."""
    _traced_worker(start_worker, isolated, receiver)
    key = f"partner-key-{uuid.uuid4().hex}"
    api = NotifyApi(
        tmp_path / "api.log",
        {
            **isolated.env,
            "NOTIFY_GATEWAY_KEYS": f"acme:{key}",
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": receiver.endpoint,
            "OTEL_BSP_SCHEDULE_DELAY": "100",
        },
    )
    try:
        trace_id, partner_span = uuid.uuid4().hex, uuid.uuid4().hex[:16]
        answer = httpx.post(
            f"{api.url}/messages/{user_id}/session",
            json={"sessionId": f"s-{uuid.uuid4().hex[:8]}", "templateId": "welcome", "context": {}},
            headers={
                "Authorization": f"Bearer {key}",
                "traceparent": f"00-{trace_id}-{partner_span}-01",
            },
            timeout=30,
        )
        assert answer.status_code == 202, answer.text
        message_id = answer.json()["id"]
        wait_for(lambda: isolated.state(message_id) == "delivered", timeout=30, what="delivery")
        deliver = wait_for(
            lambda: _delivered(receiver, [message_id]).get(message_id), timeout=30, what="spans"
        )
        assert deliver.trace_id == trace_id
        # It ends at the partner's own span, in neither process.
        ancestry = _ancestry(receiver, deliver, partner_span)
    finally:
        api.stop()
    chain = [(s.service, s.name) for s in ancestry]
    assert chain[0] == ("notify-worker", "notify.deliver")
    assert ("notify-worker", "run/tasks.send_message") in chain
    assert ("notify-api", "notify.enqueue") in chain
    server = chain[-1]
    assert server[0] == "notify-api" and server[1].startswith("POST /messages/")
    post = [s for s in receiver.received() if s.trace_id == trace_id and s.name == "notify.post"]
    assert [s.attributes["http.response.status_code"] for s in post] == [200]


def test_a_retry_is_traced_from_the_movers_publish_in_the_worker(
    start_worker,
    isolated: Isolated,
    receiver: OtlpReceiver,
    memory: InMemorySpanExporter,
    sandbox,
    user_id,
):
    """The first attempt is in the producer's trace; the retry, published by the worker's mover
    from the schedule (no traceparent kept there), in the trace of that publish."""
    sandbox.script([{"status": 503}], user_id=user_id, then={"status": 200})
    _traced_worker(start_worker, isolated, receiver)
    import tasks

    message_id = tasks.enqueue(
        user_id, f"s-{uuid.uuid4().hex[:8]}", "welcome", URL, runtime=isolated.runtime
    )
    isolated.runtime.publisher.flush()
    wait_for(lambda: isolated.state(message_id) == "delivered", timeout=30, what="delivery")
    second = wait_for(
        lambda: _delivered(receiver, [message_id]).get(message_id), timeout=30, what="spans"
    )
    [first] = [
        s
        for s in receiver.received()
        if s.name == "notify.deliver" and s.attributes.get("notify.outcome") == "retry"
    ]
    [enqueue] = [s for s in memory.get_finished_spans() if s.name == "notify.enqueue"]
    assert first.trace_id == _hex(enqueue.context.trace_id, 32)
    posts = {
        s.parent_span_id: s.attributes["http.response.status_code"]
        for s in receiver.received()
        if s.name == "notify.post"
    }
    assert posts[first.span_id] == 503 and posts[second.span_id] == 200
    assert second.attributes["notify.attempt"] == 2
    root = _ancestry(receiver, second, "")[-1]  # the mover's publish, in the worker
    assert (root.service, root.name) == (
        "notify-worker",
        f"send {isolated.env['NOTIFY_QUEUE_NAME']}",
    )
    assert second.trace_id != first.trace_id
