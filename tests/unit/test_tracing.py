"""Tracing's pure parts and its spans, with the SDK's in-memory exporter (no process, no network):
the OTEL_* switch, the traceparent in the envelope, the parent of each message's span, the
publish span's parent or links, and the trace id in log lines."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from worker.ops import tracing
from worker.ops.logs import JsonFormatter
from worker.queue.envelopes import Envelope, parse_envelope

TP = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
REQUEST = {"userId": "u1", "sessionId": "s", "templateId": "welcome", "context": {}}


@pytest.mark.parametrize(
    ("env", "chosen"),
    [
        ({}, ()),
        ({"OTEL_SERVICE_NAME": "x", "OTEL_TRACES_SAMPLER": "always_on"}, ()),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, ("otlp",)),
        ({"OTEL_TRACES_EXPORTER": "console,otlp"}, ("console", "otlp")),
        ({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, ()),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, ("otlp",)),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"}, ("otlp",)),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"}, ()),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "false"}, ("otlp",)),
    ],
)
def test_tracing_is_on_only_when_the_otel_variables_name_an_exporter(env, chosen):
    assert tracing.exporters(env) == tracing.Choice(chosen)


def test_exporters_this_build_cannot_use_are_left_out_with_a_problem():
    choice = tracing.exporters({"OTEL_TRACES_EXPORTER": "zipkin,console"})
    assert choice.exporters == ("console",)
    assert "zipkin" in choice.problems[0]
    grpc = tracing.exporters(
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}
    )
    assert grpc.exporters == () and "http/protobuf" in grpc.problems[0]


def test_otlp_header_values_are_secrets():
    env = {
        "OTEL_EXPORTER_OTLP_HEADERS": "x-api-key=abc123secret, other = v2value",
        "OTEL_EXPORTER_OTLP_TRACES_HEADERS": "authorization=Basic%20xyz",
    }
    assert tracing.header_secrets(env) == ["abc123secret", "v2value", "Basic%20xyz"]


def test_an_envelope_carries_a_traceparent_only_when_it_has_one():
    assert Envelope("m1", 1, REQUEST).to_task() == {"id": "m1", "gen": 1, "req": REQUEST}
    carried = Envelope("m1", 1, REQUEST, TP).to_task()
    assert carried["tp"] == TP
    assert parse_envelope(carried) == Envelope("m1", 1, REQUEST, TP)


@pytest.mark.parametrize("bad", [TP.upper(), TP + "x", "01" + TP[2:], 7, ""])
def test_a_traceparent_that_is_not_well_formed_is_dropped_not_the_message(bad):
    parsed = parse_envelope({"id": "m1", "gen": 1, "req": REQUEST, "tp": bad})
    assert parsed == Envelope("m1", 1, REQUEST, None)


def test_an_all_zero_trace_id_is_no_traceparent():
    assert tracing.valid_traceparent(TP) == TP
    assert tracing.valid_traceparent("00-" + "0" * 32 + "-b7ad6b7169203331-01") is None


@pytest.fixture
def off(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in ("OTEL_TRACES_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", raising=False)
    tracing.shutdown()
    yield
    tracing.shutdown()


def test_off_nothing_is_set_up_and_the_hooks_answer_none(off):
    assert tracing.active() is None
    with tracing.enqueue_span(3) as trace:
        assert trace is None
    with tracing.publishing([TP], "q") as headers:
        assert headers is None
    assert tracing.batch_trace([("m1", TP)]) is None


@pytest.fixture
def memory(off) -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    tracing.setup(exporter=exporter)
    yield exporter


def _spans(exporter: InMemorySpanExporter, name: str) -> list:
    return [span for span in exporter.get_finished_spans() if span.name == name]


def test_a_task_of_one_traces_messages_is_published_as_a_child_in_that_trace(memory):
    tracer = tracing.active().tracer  # type: ignore[union-attr]
    with tracer.start_as_current_span("request"), tracing.enqueue_span(2) as trace:
        pass
    assert trace is not None
    with tracing.publishing([trace, trace], "notify") as headers:
        assert headers is not None and headers["traceparent"][3:35] == trace[3:35]
    [enqueue] = _spans(memory, "notify.enqueue")
    [send] = _spans(memory, "send notify")
    assert send.kind == SpanKind.PRODUCER and not send.links
    assert send.parent is not None and send.parent.span_id == enqueue.context.span_id
    assert send.attributes["messaging.batch.message_count"] == 2


def test_a_task_of_several_traces_is_published_as_a_root_linked_to_each(memory):
    tracer = tracing.active().tracer  # type: ignore[union-attr]
    traces = []
    for _ in range(2):
        with tracing.enqueue_span() as trace:
            traces.append(trace)
    with (
        tracer.start_as_current_span("the publisher's own"),
        tracing.publishing([*traces, None], "notify"),
    ):
        pass
    [send] = _spans(memory, "send notify")
    assert send.parent is None
    assert [link.context.span_id for link in send.links] == [
        span.context.span_id for span in _spans(memory, "notify.enqueue")
    ]


def _provider() -> tuple[tracing._Tracing, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return tracing._Tracing(provider), exporter


def test_each_message_of_a_task_is_traced_under_its_own_producer():
    own, exporter = _provider()
    tracer = own.tracer
    with tracer.start_as_current_span("elsewhere") as other:
        carrier: dict[str, str] = {}
        own.w3c.inject(carrier)
    with tracer.start_as_current_span("run/tasks.send_message") as task:
        same: dict[str, str] = {}
        own.w3c.inject(same)
        batch = tracing.BatchTrace(
            own,
            [
                ("m-other", carrier["traceparent"]),
                ("m-task", same["traceparent"]),
                ("m-none", None),
            ],
        )
    for message_id in ("m-other", "m-task", "m-none"):
        with batch.outcome(message_id) as verdict:
            verdict.append("delivered")
    delivers = {s.attributes["messaging.message.id"]: s for s in _spans(exporter, "notify.deliver")}
    # Another trace: the message's span is under its producer's, linked to the task's span.
    assert delivers["m-other"].context.trace_id == other.get_span_context().trace_id
    assert delivers["m-other"].parent.span_id == other.get_span_context().span_id
    assert [link.context.span_id for link in delivers["m-other"].links] == [
        task.get_span_context().span_id
    ]
    # The task's own trace, or no producer at all: a child of the task's span, no link.
    for message_id in ("m-task", "m-none"):
        assert delivers[message_id].parent.span_id == task.get_span_context().span_id
        assert not delivers[message_id].links
        assert delivers[message_id].kind == SpanKind.CONSUMER


def test_a_message_span_has_claim_token_post_and_outcome_children():
    own, exporter = _provider()
    batch = tracing.BatchTrace(own, [("m1", TP), ("m2", None)])
    batch.claimed(1_000, 2_000, [("m1", "go", 3), ("m2", "done", 0)])
    batch.token(["m1"], "default", 2_500)
    batch.posting("m1")
    batch.answered("m1", 503, "cid-1", None)
    batch.posting("m1")
    batch.answered("m1", None, None, "timeout")
    with batch.outcome("m1") as verdict:
        verdict.append("dead:retries_exhausted")
    batch.close()  # m2 never got an outcome written
    [deliver, left] = sorted(_spans(exporter, "notify.deliver"), key=lambda s: s.start_time)
    assert deliver.context.trace_id == int(TP[3:35], 16)
    assert deliver.attributes["notify.outcome"] == "dead:retries_exhausted"
    assert deliver.attributes["notify.attempt"] == 3
    assert deliver.status.status_code == StatusCode.ERROR
    assert left.status.status_code == StatusCode.ERROR and left.status.description == "no outcome"
    children = [
        s
        for s in exporter.get_finished_spans()
        if s.parent and s.parent.span_id == deliver.context.span_id
    ]
    names = sorted(s.name for s in children)
    assert names == ["notify.claim", "notify.outcome", "notify.post", "notify.post", "notify.token"]
    [claim] = [s for s in children if s.name == "notify.claim"]
    assert (claim.start_time, claim.end_time) == (1_000, 2_000)
    assert claim.attributes == {"notify.claim": "go", "notify.attempt": 3}
    first, second = sorted(
        (s for s in children if s.name == "notify.post"), key=lambda s: s.start_time
    )
    assert first.attributes["http.response.status_code"] == 503
    assert first.attributes["concur.correlation_id"] == "cid-1"
    assert second.attributes["error.type"] == "timeout"
    assert second.status.status_code == StatusCode.ERROR
    [claim2] = [
        s for s in _spans(exporter, "notify.claim") if s.attributes["notify.claim"] == "done"
    ]
    assert claim2.parent.span_id == left.context.span_id


def test_a_line_logged_while_a_span_is_current_carries_its_trace_id(memory):
    tracer = tracing.active().tracer  # type: ignore[union-attr]
    formatter = JsonFormatter()
    logger = logging.getLogger("notify.test")

    def line(**extra: object) -> dict:
        record = logger.makeRecord(
            "notify.test", logging.INFO, __file__, 1, "hello", (), None, extra=extra
        )
        assert tracing.TraceIdFilter().filter(record)
        return json.loads(formatter.format(record))

    assert "trace_id" not in line()
    with tracer.start_as_current_span("work") as span:
        written = line(message_id="m1")
    context = span.get_span_context()
    assert written["trace_id"] == format(context.trace_id, "032x")
    assert written["span_id"] == format(context.span_id, "016x")
    assert list(written)[-3:] == ["message_id", "trace_id", "span_id"]  # after the extras
