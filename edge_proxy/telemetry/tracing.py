"""OpenTelemetry: one SERVER span per proxied request, W3C ``traceparent`` to the backend. Must not
put prompt or completion text on a span, nor touch the global TracerProvider.

Span name ``{gen_ai.operation.name} {gen_ai.request.model}``; attributes follow the GenAI semantic
conventions (Development status, semantic-conventions-genai as of 2026) plus ``edge.*`` for what the
spec lacks (energy, timeline). A ``gen_ai.first_token`` event marks the first content token.
Export: OTLP over HTTP only when an endpoint is configured (``tracing.otlp_endpoint`` or
``OTEL_EXPORTER_OTLP_ENDPOINT``); tests pass their own exporter. Each runtime has its own
TracerProvider (the global one is never touched).
"""
from __future__ import annotations

import time
from typing import Any, Mapping

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor, SpanExporter
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from edge_proxy.config import TracingSettings
from edge_proxy.proxy.hooks import BaseObserver, RequestRecord

_PROPAGATOR = TraceContextTextMapPropagator()
SPAN_KEY = "otel_span"
MAX_REQUEST_MODEL_CHARS = 256      # the client's model string, as an attribute, is cut to this


class Tracing(BaseObserver):
    def __init__(self, provider: TracerProvider, provider_name: str = "edge_eval",
                 server_address: str | None = None, server_port: int | None = None) -> None:
        self.provider = provider
        self.tracer = provider.get_tracer("edge_proxy")
        self.provider_name = provider_name
        self.server_address = server_address
        self.server_port = server_port
        # Monotonic -> epoch offset: spans need wall-clock ns, the timeline is monotonic ns.
        self._offset_ns = time.time_ns() - time.monotonic_ns()

    def _epoch(self, t_mono_ns: int) -> int:
        return t_mono_ns + self._offset_ns

    def start(self, rec: RequestRecord, request_model: str | None, incoming: Mapping[str, str]) -> None:
        parent = _PROPAGATOR.extract(carrier=incoming) if "traceparent" in incoming else None
        # the span name carries the served model (a bounded label), never the client's free-form
        # string: span names are what trace backends group by
        name = f"{rec.operation} {rec.model}"
        attrs: dict[str, Any] = {
            "gen_ai.operation.name": rec.operation,
            "gen_ai.provider.name": self.provider_name,
            "gen_ai.request.model": (request_model or rec.model)[:MAX_REQUEST_MODEL_CHARS],
            "gen_ai.request.stream": rec.stream,
            "http.route": rec.route,
            "edge.request.id": rec.request_id,
        }
        if rec.client_request_id is not None:
            attrs["edge.client_request.id"] = rec.client_request_id
        if rec.max_tokens is not None:
            attrs["gen_ai.request.max_tokens"] = rec.max_tokens
        if self.server_address:
            attrs["server.address"] = self.server_address
        if self.server_port:
            attrs["server.port"] = self.server_port
        span = self.tracer.start_span(name, context=parent, kind=SpanKind.SERVER,
                                      attributes=attrs, start_time=self._epoch(rec.t_received_ns))
        rec.extra[SPAN_KEY] = span

    def inject(self, rec: RequestRecord, headers: dict[str, str]) -> None:
        span = rec.extra.get(SPAN_KEY)
        if span is not None:
            _PROPAGATOR.inject(headers, context=trace.set_span_in_context(span))  # type: ignore[arg-type]

    def on_request_final(self, rec: RequestRecord) -> None:
        span = rec.extra.pop(SPAN_KEY, None)
        if span is None:
            return
        if rec.t_first_token_ns is not None:
            span.add_event("gen_ai.first_token", timestamp=self._epoch(rec.t_first_token_ns))
        a: dict[str, Any] = {"edge.outcome": rec.outcome or "error",
                             "edge.token_count_source": rec.token_count_source,
                             "gen_ai.response.model": rec.model}
        if rec.status is not None:
            a["http.response.status_code"] = rec.status
        if rec.input_tokens is not None:
            a["gen_ai.usage.input_tokens"] = rec.input_tokens
        if rec.output_tokens is not None:
            a["gen_ai.usage.output_tokens"] = rec.output_tokens
        if rec.finish_reason:
            a["gen_ai.response.finish_reasons"] = [rec.finish_reason]
        if rec.ttft_seconds is not None:
            a["gen_ai.response.time_to_first_chunk"] = rec.ttft_seconds
        if rec.tpot_seconds is not None:
            a["edge.time_per_output_token_seconds"] = rec.tpot_seconds
        if rec.backend_queue_seconds is not None:
            a["edge.backend_queue_seconds"] = rec.backend_queue_seconds
        if rec.energy is not None:
            a["edge.energy.joules"] = rec.energy.full_joules
            a["edge.energy.active_joules"] = rec.energy.active_joules
            a["edge.energy.source"] = rec.energy.source
            a["edge.energy.attribution"] = rec.energy.attribution
        if rec.cold_start:
            a["edge.cold_start"] = True
            if rec.cold_start_wait_seconds is not None:
                a["edge.cold_start.wait_seconds"] = rec.cold_start_wait_seconds
        if rec.error_type:
            a["error.type"] = rec.error_type
            span.set_status(Status(StatusCode.ERROR, rec.error_type))
        span.set_attributes(a)
        span.end(end_time=self._epoch(rec.t_end_ns or time.monotonic_ns()))

    def shutdown(self) -> None:
        self.provider.shutdown()


def create_tracing(settings: TracingSettings, exporter: SpanExporter | None = None,
                   host: str | None = None, port: int | None = None,
                   provider_name: str = "edge_eval") -> Tracing | None:
    """Tracing with ``exporter`` (tests: InMemorySpanExporter, simple processor), else OTLP/HTTP
    when an endpoint is configured, else None (tracing off: no spans are created at all)."""
    if exporter is None and not settings.otlp_endpoint:
        return None
    provider = TracerProvider(resource=Resource.create({"service.name": settings.service_name}))
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        endpoint = settings.otlp_endpoint or ""
        if not endpoint.rstrip("/").endswith("/v1/traces"):
            endpoint = endpoint.rstrip("/") + "/v1/traces"
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    return Tracing(provider, provider_name=provider_name, server_address=host, server_port=port)
