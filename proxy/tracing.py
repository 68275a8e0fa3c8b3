"""OpenTelemetry traces, opt-in (``tracing.enabled``, extra ``otel``): one span per request with
the GenAI semantic-convention attributes and wattproxy's energy under ``wattproxy.*``, its
context sent upstream as ``traceparent``, its trace id on the record (``trace_id``) and as the
exemplar of the request-energy histogram.

A span starts with the request (continuing the client's ``traceparent`` when it sent one) and
is exported once the request's record is final, when its energy is known; its end time is the
request's end. Export runs in the SDK's ``BatchSpanProcessor`` thread, off the request path,
bounded by its queue (spans past ``max_queue_size`` are dropped, never waited for).

Disabled, or without the SDK, ``build_tracing`` returns ``NullTracing``: nothing of
OpenTelemetry is imported and each hook is a no-op call. Attribute names are in
docs/metrics.md ("Traces").
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, MutableMapping
from typing import Any

from proxy.config import TracingConfig
from proxy.records import RequestRecord
from proxy.tasks import OTHER

log = logging.getLogger("wattproxy.tracing")

#: Request paths (their last segments) whose GenAI operation is ``chat``.
CHAT_PATHS = ("/chat/completions", "/api/chat", "/v1/messages", "/v1/responses")
#: Tasks whose GenAI operation is ``embeddings``.
EMBEDDING_TASKS = frozenset(("feature-extraction", "sentence-similarity"))
#: The record field that holds a traced request's trace id (32 hex digits).
TRACE_ID_FIELD = "trace_id"


def operation_name(task: str, path: str) -> str:
    """The GenAI ``gen_ai.operation.name`` of a request: ``chat``, ``text_completion``,
    ``embeddings``, ``generate_content`` for other inference; the task itself for ``other``."""
    if task == OTHER:
        return OTHER
    if path.endswith(CHAT_PATHS):
        return "chat"
    if task in EMBEDDING_TASKS:
        return "embeddings"
    if task == "text-generation":
        return "text_completion"
    return "generate_content"


def span_name(operation: str, model: str | None) -> str:
    """``{operation} {model}``, as the GenAI conventions name inference spans."""
    return f"{operation} {model}" if model else operation


def end_attributes(record: RequestRecord, operation: str) -> dict[str, Any]:
    """The attributes of a final record's span (none is a key or a secret)."""
    attrs: dict[str, Any] = {
        "gen_ai.operation.name": operation,
        "http.response.status_code": record.status,
        "wattproxy.request_id": record.request_id,
        "wattproxy.upstream": record.upstream,
        "wattproxy.task": record.task,
        "wattproxy.user": record.user,
        "wattproxy.outcome": record.outcome,
        "wattproxy.energy_j": record.energy_j,
        "wattproxy.co2e_g": record.co2e_g,
        "wattproxy.source": record.source,
        "wattproxy.final": record.final,
        "wattproxy.tokens_source": record.tokens_source,
    }
    if record.model:
        attrs["gen_ai.request.model"] = record.model
    if record.prompt_tokens is not None:
        attrs["gen_ai.usage.input_tokens"] = record.prompt_tokens
    if record.completion_tokens is not None:
        attrs["gen_ai.usage.output_tokens"] = record.completion_tokens
    if record.team:
        attrs["wattproxy.team"] = record.team
    if record.embodied_co2e_g is not None:  # only where the device's figures are configured
        attrs["wattproxy.embodied_co2e_g"] = record.embodied_co2e_g
    if record.water_l is not None:
        attrs["wattproxy.water_l"] = record.water_l
    if record.outcome != "ok":
        attrs["error.type"] = record.outcome
    elif record.status >= 500:
        attrs["error.type"] = str(record.status)
    return attrs


def exemplar(record: RequestRecord) -> dict[str, str] | None:
    """The exemplar of a record's energy observation: its trace id, when it was traced."""
    trace_id = record.extra.get(TRACE_ID_FIELD)
    return {"trace_id": trace_id} if trace_id else None


class NullTracing:
    """Tracing off: every hook does nothing."""

    enabled = False

    @property
    def open_spans(self) -> int:
        """Spans started and not yet finished (waiting for their final records)."""
        return 0

    def start(self, record: RequestRecord, headers: Mapping[str, str], path: str) -> None:
        pass

    def inject(self, request_id: str, headers: MutableMapping[str, str]) -> None:
        pass

    def finish(self, record: RequestRecord) -> None:
        pass

    def close(self) -> None:
        pass


class OTelTracing(NullTracing):
    """Spans through the OpenTelemetry SDK and its OTLP/HTTP exporter.

    Args:
        cfg: the ``tracing`` section.
        exporter: where spans go (the OTLP/HTTP exporter of ``cfg.endpoint`` by default).
    """

    enabled = True

    def __init__(self, cfg: TracingConfig, exporter: Any = None) -> None:
        from opentelemetry import trace
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self._trace = trace
        self._server = trace.SpanKind.SERVER
        self._propagator = TraceContextTextMapPropagator()
        self.provider = TracerProvider(
            resource=Resource.create({"service.name": cfg.service_name}),
            sampler=ParentBased(TraceIdRatioBased(cfg.sample_ratio)),
        )
        if exporter is None:
            exporter = OTLPSpanExporter(endpoint=cfg.endpoint, timeout=cfg.timeout_s)
        self.provider.add_span_processor(
            BatchSpanProcessor(
                exporter,
                max_queue_size=cfg.max_queue_size,
                schedule_delay_millis=cfg.export_interval_ms,
                max_export_batch_size=min(cfg.max_export_batch_size, cfg.max_queue_size),
                export_timeout_millis=cfg.timeout_s * 1000,
            )
        )
        self.tracer = self.provider.get_tracer("wattproxy")
        #: request id -> (span, operation) until the request's record is final; as bounded as
        #: the requests in flight
        self._open: dict[str, tuple[Any, str]] = {}

    @property
    def open_spans(self) -> int:
        return len(self._open)

    def start(self, record: RequestRecord, headers: Mapping[str, str], path: str) -> None:
        """Open the request's span, a child of the client's ``traceparent`` if it sent one."""
        parent = self._propagator.extract(headers) if "traceparent" in headers else None
        operation = operation_name(record.task, path)
        span = self.tracer.start_span(
            span_name(operation, record.model), context=parent, kind=self._server
        )
        self._open[record.request_id] = (span, operation)
        ctx = span.get_span_context()
        if ctx.trace_flags.sampled:
            record.extra[TRACE_ID_FIELD] = f"{ctx.trace_id:032x}"

    def inject(self, request_id: str, headers: MutableMapping[str, str]) -> None:
        """Set ``traceparent`` (and ``tracestate``) of the upstream request to its span."""
        held = self._open.get(request_id)
        if held is not None:
            self._propagator.inject(headers, self._trace.set_span_in_context(held[0]))

    def finish(self, record: RequestRecord) -> None:
        """End the span of a final record, at the request's end, with its figures."""
        held = self._open.pop(record.request_id, None)
        if held is None:
            return
        span, operation = held
        span.update_name(span_name(operation, record.model))
        span.set_attributes(end_attributes(record, operation))
        if record.status >= 500 or record.outcome != "ok":
            span.set_status(self._trace.Status(self._trace.StatusCode.ERROR, record.outcome))
        start_ns = getattr(span, "start_time", None)
        end_ns = None
        if start_ns is not None and record.duration_s is not None:
            end_ns = start_ns + int(record.duration_s * 1e9)
        span.end(end_time=end_ns)

    def close(self) -> None:
        """Export what is queued and stop the exporter (blocking: call it off the loop)."""
        self.provider.shutdown()


def build_tracing(cfg: TracingConfig) -> NullTracing:
    """The tracing of ``cfg``: ``NullTracing`` when disabled or when the SDK is missing."""
    if not cfg.enabled:
        return NullTracing()
    try:
        return OTelTracing(cfg)
    except ImportError as e:
        log.warning(
            "tracing.enabled is true but the OpenTelemetry SDK is not installed (%s); no spans "
            "are exported: pip install 'wattproxy[otel]'",
            e,
        )
        return NullTracing()
