"""OpenTelemetry tracing, off unless the standard ``OTEL_*`` variables name an exporter.

The switch (``exporters``, pure): tracing is on in a process when ``OTEL_TRACES_EXPORTER``
names an exporter (``otlp``, ``console``; ``none`` is off), or, with that variable unset, when
``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` is set (OTLP then);
``OTEL_SDK_DISABLED=true`` turns it off whatever else is set. Nothing else turns it on: the
specification's default exporter (``otlp`` with nothing set) would have every deployment post
spans to localhost:4318, so here the default is none. Off, no SDK is set up and nothing of
OpenTelemetry's is imported; every hook below answers ``None`` from one global's check.

On, a process builds one ``TracerProvider`` (resource, sampler and batch processor from the
standard variables: ``OTEL_SERVICE_NAME``, ``OTEL_TRACES_SAMPLER``, ``OTEL_BSP_*``), exports with
OTLP over HTTP/protobuf (the exporter reads ``OTEL_EXPORTER_OTLP_*``) or to the console, and adds
``trace_id`` and ``span_id`` to each log line written while a span is current.

What travels (docs/tracing.md draws it): a producer (the gateway's request, ``tasks.enqueue``,
``enqueue_many``) opens a ``notify.enqueue`` span, and each message it records carries that
span's W3C ``traceparent`` in its task envelope (``Envelope.trace``, field ``tp``), because a task
carries up to ``NOTIFY_BATCH_SIZE`` messages from as many requests and is published later by a
background thread that no request's context reaches. The publish (``publishing``) is one
``send`` span per task: the child of the messages' trace when they all share one, else a root
linked to each; its context goes in the task's headers, where Celery's instrumentation (in the
worker) picks it up as the parent of the task's ``run`` span. In the worker each message gets
its own ``notify.deliver`` span under its own producer's context (``BatchTrace``), linked to the
task's span when that is another trace, with children ``notify.claim``, ``notify.token``,
``notify.post`` (Concur's correlation id as an attribute) and ``notify.outcome``.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from worker.ops.logs import add_log_filter, add_secret, remove_log_filter
from worker.shapes.models import TRACEPARENT_PATTERN

if TYPE_CHECKING:  # imported at run time only when tracing is on
    from opentelemetry.context import Context
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Span, Tracer

log = logging.getLogger("notify.tracing")

TRACER_NAME = "notify"
KNOWN_EXPORTERS = ("otlp", "console")


@dataclass(frozen=True, slots=True)
class Choice:
    """What the ``OTEL_*`` variables ask for: the exporters (none: tracing off) and problems."""

    exporters: tuple[str, ...]
    problems: tuple[str, ...] = ()


def exporters(env: Mapping[str, str]) -> Choice:
    """Which span exporters the variables name (pure; see the module's docstring for the rule).

    Names this build cannot export with are left out, each with a problem to log: an unknown
    name, and ``otlp`` over gRPC (only HTTP/protobuf is installed).
    """
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return Choice(())
    named = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if named:
        wanted = [name.strip() for name in named.split(",") if name.strip()]
    elif env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        wanted = ["otlp"]
    else:
        return Choice(())
    if "none" in wanted:
        return Choice(())
    chosen: list[str] = []
    problems: list[str] = []
    protocol = (
        env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "http/protobuf"
    ).strip()
    for name in dict.fromkeys(wanted):
        if name not in KNOWN_EXPORTERS:
            problems.append(
                f"OTEL_TRACES_EXPORTER: unknown exporter {name!r} (known: otlp, console)"
            )
        elif name == "otlp" and protocol != "http/protobuf":
            problems.append(
                f"OTLP protocol {protocol!r} is not installed: set "
                "OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf (port 4318)"
            )
        else:
            chosen.append(name)
    return Choice(tuple(chosen), tuple(problems))


def header_secrets(env: Mapping[str, str]) -> list[str]:
    """The values of ``OTEL_EXPORTER_OTLP_[TRACES_]HEADERS`` (``k=v,k=v``): often an API key."""
    found = []
    for name in ("OTEL_EXPORTER_OTLP_HEADERS", "OTEL_EXPORTER_OTLP_TRACES_HEADERS"):
        for pair in env.get(name, "").split(","):
            _, equals, value = pair.partition("=")
            if equals and value.strip():
                found.append(value.strip())
    return found


def valid_traceparent(value: object) -> str | None:
    """``value`` when it is a well-formed W3C traceparent (version 00), else None (pure)."""
    if isinstance(value, str) and TRACEPARENT_PATTERN.fullmatch(value) and value[3:35] != "0" * 32:
        return value
    return None


# -- the process's set-up ----------------------------------------------------------------------


class _Tracing:
    """A process's provider and tracer, once tracing is on."""

    def __init__(self, provider: TracerProvider) -> None:
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.provider = provider
        self.tracer: Tracer = provider.get_tracer(TRACER_NAME)
        self.w3c = TraceContextTextMapPropagator()
        self.log_filter = TraceIdFilter()


_tracing: _Tracing | None = None
_checked = False
_lock = threading.Lock()


def active() -> _Tracing | None:
    """The process's tracing, set up from the environment on first use; None when off."""
    if _checked:
        return _tracing
    return setup()


def setup(*, service_name: str = "notify", exporter: SpanExporter | None = None) -> _Tracing | None:
    """Set tracing up once per process from ``os.environ`` (a later call returns the first's).

    ``exporter``: export to it instead of what the variables name, and turn tracing on (the
    tests' in-memory exporter). ``service_name`` is the default when ``OTEL_SERVICE_NAME`` and
    ``OTEL_RESOURCE_ATTRIBUTES`` name none.
    """
    global _tracing, _checked
    with _lock:
        if _checked:
            return _tracing
        choice = exporters(os.environ)
        for problem in choice.problems:
            log.error("tracing: %s", problem)
        if exporter is not None or choice.exporters:
            _tracing = _build(service_name, choice.exporters, exporter)
            add_log_filter(_tracing.log_filter)
            log.info(
                "tracing on: exporting to %s",
                "a test exporter" if exporter is not None else ", ".join(choice.exporters),
            )
        _checked = True
        return _tracing


def _build(service_name: str, names: Sequence[str], exporter: SpanExporter | None) -> _Tracing:
    from opentelemetry import trace
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import (
        BatchSpanProcessor,
        ConsoleSpanExporter,
        SimpleSpanProcessor,
    )

    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: service_name}))
    provider = TracerProvider(resource=resource)
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    for name in names:
        if name == "otlp":
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

            # An OTLP header value is often the backend's API key: never in a log line.
            add_secret(*header_secrets(os.environ))
            provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        elif name == "console":
            provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    # The global provider too, unless the process has one of its own (a partner's app calling
    # tasks.enqueue) or this is a test's: the instrumentations are given ours either way.
    if exporter is None and type(trace.get_tracer_provider()).__name__ == "ProxyTracerProvider":
        trace.set_tracer_provider(provider)
    return _Tracing(provider)


def instrument_celery() -> None:
    """In a worker process, when tracing is on: Celery's instrumentation (a ``run`` span per
    task, its parent read from the task's headers; a span per publish).

    Only in the worker: there the send task is registered, which the instrumentation needs to
    close the span it opens for a publish (in a producer process it would leave each open).
    """
    tracing = setup(service_name="notify-worker")
    if tracing is None:
        return
    from opentelemetry.instrumentation.celery import CeleryInstrumentor

    instrumentor = CeleryInstrumentor()  # type: ignore[no-untyped-call]
    if not instrumentor.is_instrumented_by_opentelemetry:
        instrumentor.instrument(tracer_provider=tracing.provider)


def instrument_app(app: Any) -> None:
    """The gateway's Starlette app, when tracing is on: a server span per request.

    ``OTEL_PYTHON_STARLETTE_EXCLUDED_URLS`` leaves paths out (e.g. ``healthz,readyz,metrics``).
    """
    tracing = setup(service_name="notify-api")
    if tracing is None:
        return
    from opentelemetry.instrumentation.starlette import StarletteInstrumentor

    StarletteInstrumentor.instrument_app(app, tracer_provider=tracing.provider)


def flush(timeout_seconds: float = 5.0) -> None:
    """Export the spans ended so far (a process about to exit; tests)."""
    if _tracing is not None:
        _tracing.provider.force_flush(int(timeout_seconds * 1000))


def shutdown() -> None:
    """Export what is left and forget the set-up: the next ``active()`` reads the environment
    again (a test that turned tracing on for itself)."""
    global _tracing, _checked
    with _lock:
        if _tracing is not None:
            _tracing.provider.shutdown()
            remove_log_filter(_tracing.log_filter)
        _tracing, _checked = None, False


# -- logs --------------------------------------------------------------------------------------


class TraceIdFilter(logging.Filter):
    """Adds ``trace_id`` and ``span_id`` (hex) to a record logged while a span is current.

    A handler filter (``worker.ops.logs.add_log_filter``), so the fields come after the record's
    own ``extra=`` ones (Sentry keeps an event's first ten extras).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        """Never drops a record."""
        from opentelemetry import trace

        context = trace.get_current_span().get_span_context()
        if context.is_valid and not hasattr(record, "trace_id"):
            record.trace_id = format(context.trace_id, "032x")
            record.span_id = format(context.span_id, "016x")
        return True


# -- producers ---------------------------------------------------------------------------------


@contextmanager
def enqueue_span(count: int = 1, message_id: str | None = None) -> Iterator[str | None]:
    """A producer's ``notify.enqueue`` span around recording ``count`` messages; yields the
    ``traceparent`` each message carries (None when tracing is off)."""
    tracing = active()
    if tracing is None:
        yield None
        return
    from opentelemetry.trace import SpanKind

    with tracing.tracer.start_as_current_span("notify.enqueue", kind=SpanKind.PRODUCER) as span:
        span.set_attribute("messaging.system", "notify")
        span.set_attribute("messaging.batch.message_count", count)
        if message_id is not None:
            span.set_attribute("messaging.message.id", message_id)
        carrier: dict[str, str] = {}
        tracing.w3c.inject(carrier)
        yield valid_traceparent(carrier.get("traceparent"))


def _context_of(tracing: _Tracing, traceparent: str) -> Context:
    return tracing.w3c.extract({"traceparent": traceparent})


@contextmanager
def publishing(traces: Sequence[str | None], destination: str) -> Iterator[dict[str, str] | None]:
    """A ``send`` span around publishing one task of messages with these ``traces``; yields the
    task's headers carrying its context (None when tracing is off).

    All the messages of one trace: the span is a child there, so the task's ``run`` span joins
    that trace. Several traces: a root span linked to each (they stay in their own traces).
    """
    tracing = active()
    if tracing is None:
        yield None
        return
    from opentelemetry import trace
    from opentelemetry.trace import Link, SpanKind

    distinct = list(dict.fromkeys(traces))
    parent = None
    links: list[Link] = []
    if len(distinct) == 1 and distinct[0] is not None:
        parent = _context_of(tracing, distinct[0])
    else:
        for value in distinct:
            if value is not None:
                linked = trace.get_current_span(_context_of(tracing, value)).get_span_context()
                if linked.is_valid:
                    links.append(Link(linked))
        parent = trace.set_span_in_context(trace.INVALID_SPAN)  # a root, whatever is current
    with tracing.tracer.start_as_current_span(
        f"send {destination}", context=parent, kind=SpanKind.PRODUCER, links=links
    ) as span:
        span.set_attribute("messaging.system", "celery")
        span.set_attribute("messaging.destination.name", destination)
        span.set_attribute("messaging.batch.message_count", len(traces))
        headers: dict[str, str] = {}
        from opentelemetry.propagate import inject

        inject(headers)
        yield headers


# -- the worker --------------------------------------------------------------------------------


def batch_trace(message_ids: Sequence[tuple[str, str | None]]) -> BatchTrace | None:
    """The spans of one task's messages ``(id, traceparent)``; None when tracing is off."""
    tracing = active()
    if tracing is None:
        return None
    return BatchTrace(tracing, message_ids)


def _now_ns() -> int:
    return time.time_ns()


class BatchTrace:
    """One task's messages, each in its own trace: a ``notify.deliver`` span per message and
    its children, written as the attempt goes (``worker.delivery.attempts`` calls these)."""

    def __init__(self, tracing: _Tracing, message_ids: Sequence[tuple[str, str | None]]) -> None:
        from opentelemetry import context, trace
        from opentelemetry.trace import Link, SpanKind

        self._trace = trace
        self._tracer = tracing.tracer
        self._spans: dict[str, Span] = {}
        self._posting: dict[str, int] = {}
        here = context.get_current()
        task = trace.get_current_span().get_span_context()
        for message_id, traceparent in message_ids:
            parent, links = here, []
            if traceparent is not None:
                own = _context_of(tracing, traceparent)
                producer = trace.get_current_span(own).get_span_context()
                if producer.is_valid and producer.trace_id != (task.trace_id if task else 0):
                    # Another trace than the task's: the message stays in its producer's trace.
                    parent = own
                    links = [Link(task)] if task.is_valid else []
            span = self._tracer.start_span(
                "notify.deliver", context=parent, kind=SpanKind.CONSUMER, links=links
            )
            span.set_attribute("messaging.system", "notify")
            span.set_attribute("messaging.message.id", message_id)
            self._spans[message_id] = span

    def _child(
        self, message_id: str, name: str, start_ns: int, attributes: dict[str, Any]
    ) -> Span | None:
        parent = self._spans.get(message_id)
        if parent is None:
            return None
        return self._tracer.start_span(
            name,
            context=self._trace.set_span_in_context(parent),
            start_time=start_ns,
            attributes=attributes,
        )

    def claimed(self, start_ns: int, end_ns: int, claims: Sequence[tuple[str, str, int]]) -> None:
        """The task's claims ``(id, verdict, attempt)`` (one round trip for all, so one time)."""
        for message_id, verdict, attempt in claims:
            span = self._child(message_id, "notify.claim", start_ns, {"notify.claim": verdict})
            if span is not None:
                if verdict == "go":
                    span.set_attribute("notify.attempt", attempt)
                    self._spans[message_id].set_attribute("notify.attempt", attempt)
                span.end(end_ns)

    def token(
        self,
        message_ids: Sequence[str],
        company: str,
        start_ns: int,
        *,
        refresh: bool = False,
        error: str | None = None,
    ) -> None:
        """One company's token call, shared by these messages (a span in each's trace)."""
        end_ns = _now_ns()
        for message_id in message_ids:
            span = self._child(
                message_id,
                "notify.token",
                start_ns,
                {"notify.company": company, "notify.token.refresh": refresh},
            )
            if span is not None:
                if error is not None:
                    span.set_status(self._trace.Status(self._trace.StatusCode.ERROR, error))
                span.end(end_ns)

    def posting(self, message_id: str) -> None:
        """The message's post is about to start."""
        self._posting[message_id] = _now_ns()

    def answered(
        self, message_id: str, status: int | None, correlation_id: str | None, failure: str | None
    ) -> None:
        """The post's answer: an HTTP status and Concur's correlation id, or a transport
        failure's kind."""
        start_ns = self._posting.pop(message_id, None)
        if start_ns is None:
            return
        attributes: dict[str, Any] = {"http.request.method": "POST"}
        if status is not None:
            attributes["http.response.status_code"] = status
        if correlation_id:
            attributes["concur.correlation_id"] = correlation_id
        if failure is not None:
            attributes["error.type"] = failure
        span = self._child(message_id, "notify.post", start_ns, attributes)
        if span is not None:
            if failure is not None or (status is not None and status >= 500):
                span.set_status(self._trace.Status(self._trace.StatusCode.ERROR))
            span.end()

    @contextmanager
    def outcome(self, message_id: str) -> Iterator[list[str]]:
        """Around writing the message's end: a current ``notify.outcome`` span (its log line
        carries the trace id). Append the verdict to the yielded list; the message's span ends
        here."""
        verdict: list[str] = []
        span = self._child(message_id, "notify.outcome", _now_ns(), {})
        if span is None:
            yield verdict
            return
        with self._trace.use_span(span, end_on_exit=True):
            yield verdict
            if verdict:
                span.set_attribute("notify.outcome", verdict[0])
        deliver = self._spans.pop(message_id)
        if verdict:
            deliver.set_attribute("notify.outcome", verdict[0])
            if verdict[0].startswith("dead:"):
                deliver.set_status(self._trace.Status(self._trace.StatusCode.ERROR, verdict[0]))
        deliver.end()

    def close(self) -> None:
        """End the spans of messages whose end was never written (an unexpected error)."""
        for span in self._spans.values():
            span.set_status(self._trace.Status(self._trace.StatusCode.ERROR, "no outcome"))
            span.end()
        self._spans.clear()
