"""Prometheus metrics of the proxy core (prefix ``edge_proxy_``), one registry per runtime. Records
finished requests only: must not compute energy, economics or cold-start numbers (their components
export their own); every name it exports is listed in :mod:`edge_proxy.telemetry.catalogue`.

Buckets: the OTel GenAI server lists (semantic-conventions-genai, Development status) with the
SLO edges 0.2 s and 2 s added to time-to-first-token and sub-10 ms edges added to the per-token
histograms (a superset, so every OTel edge is still an edge here). Labels are bounded: ``model``
(configured or backend-reported name, never the client's string), ``backend`` (kind), ``route``
(one of the instrumented routes or ``other``), ``stream``, ``status``, ``outcome``, ``type``,
``source``.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from edge_proxy.proxy.hooks import BaseObserver, RequestRecord
from edge_proxy.economics.metric_children import BatchHistogram, Children, observe_many

# OTel GenAI gen_ai.server.request.duration
DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48,
                    40.96, 81.92)
# OTel GenAI gen_ai.server.time_to_first_token + 0.2 and 2.0 (SLO edges)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.2, 0.25, 0.5, 0.75, 1.0, 2.0,
                2.5, 5.0, 7.5, 10.0)
# OTel GenAI gen_ai.server.time_per_output_token + 0.001, 0.0025, 0.005 (fast small models)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
                0.75, 1.0, 2.5)
QUEUE_BUCKETS = TTFT_BUCKETS
UPSTREAM_ERROR_TYPES = ("connect", "timeout", "upstream_status", "stream_broken")


class ProxyMetrics(BaseObserver):
    """Owns the core metrics; records a request in ``on_request_final`` (after energy is final)."""

    def __init__(self, registry: CollectorRegistry, backend_kind: str = "unknown") -> None:
        self.registry = registry
        self.backend_kind = backend_kind
        p = "edge_proxy_"
        self.requests = Counter(
            p + "requests", "Proxied requests by final outcome.",
            ["model", "backend", "route", "stream", "status", "outcome"], registry=registry)
        self.duration = Histogram(
            p + "request_duration_seconds",
            "End-to-end: proxy receipt of the request to the last byte sent to the client.",
            ["model", "route", "stream", "outcome"], buckets=DURATION_BUCKETS, registry=registry)
        self.ttft = Histogram(
            p + "time_to_first_token_seconds",
            "Streaming only: proxy receipt of the request to the first content token from the backend.",
            ["model", "route"], buckets=TTFT_BUCKETS, registry=registry)
        self.itl = BatchHistogram(           # many observations per request: metric_children
            p + "inter_token_latency_seconds",
            "Streaming only: gap between consecutive output tokens (per token; tokens in one chunk share its time).",
            ["model", "route"], buckets=TPOT_BUCKETS, registry=registry)
        self.tpot = Histogram(
            p + "time_per_output_token_seconds",
            "Streaming only, successful requests: (t_last - t_first) / (output_tokens - 1).",
            ["model", "route"], buckets=TPOT_BUCKETS, registry=registry)
        self.queue = Histogram(
            p + "backend_queue_duration_seconds",
            "Queue time reported by the backend (TGI x-queue-time, vLLM metrics.queue_time_ms).",
            ["model", "route"], buckets=QUEUE_BUCKETS, registry=registry)
        self.tokens = Counter(
            p + "tokens", "Tokens by type (input|output) and count source (backend|chunks).",
            ["model", "route", "type", "source"], registry=registry)
        self.in_flight = Gauge(
            p + "in_flight_requests", "Requests received and not yet ended (response finished, failed or cancelled).",
            registry=registry)
        self.upstream_errors = Counter(
            p + "upstream_errors", "Backend failures by type (connect|timeout|upstream_status|stream_broken).",
            ["type"], registry=registry)
        self.client_cancels = Counter(
            p + "client_disconnects", "Requests cancelled because the client went away.",
            registry=registry)
        self.process_errors = Counter(
            p + "process_errors", "Failures of the proxy process itself, not the backend (type: fd_exhausted).",
            ["type"], registry=registry)
        # label children looked up once (the per-request path, see metric_children)
        self._requests = Children(self.requests)
        self._duration = Children(self.duration)
        self._ttft = Children(self.ttft)
        self._itl = Children(self.itl)
        self._tpot = Children(self.tpot)
        self._queue = Children(self.queue)
        self._tokens = Children(self.tokens)
        self._upstream_errors = Children(self.upstream_errors)
        for t in UPSTREAM_ERROR_TYPES:       # known up front: start at 0 (visible to rate())
            self.upstream_errors.labels(t)
        self._touched: set[tuple[str, str, bool]] = set()

    def touch(self, model: str, route: str, stream: bool) -> None:
        """Create a (model, route) combination's main series at 0 when it is first seen, before its
        first request ends: the first increment then shows in rate() and increase() (a series
        born with value 1 does not). The ok/200 request count, its duration, TTFT/ITL/TPOT for
        streams, and the backend token counts; other statuses and outcomes appear when they occur."""
        key = (model, route, stream)
        if key in self._touched or len(self._touched) >= 1000:
            return
        self._touched.add(key)
        s = "true" if stream else "false"
        self._requests(model, self.backend_kind, route, s, "200", "ok")
        self._duration(model, route, s, "ok")
        for t in ("input", "output"):
            self._tokens(model, route, t, "backend")
        if stream:
            self._ttft(model, route)
            self._itl(model, route)
            self._tpot(model, route)

    def on_request_final(self, rec: RequestRecord) -> None:
        model, route = rec.model, rec.route
        stream = "true" if rec.stream else "false"
        outcome = rec.outcome or "error"
        self._requests(model, self.backend_kind, route, stream, str(rec.status or 0), outcome).inc()
        d = rec.duration_seconds
        if d is not None:
            self._duration(model, route, stream, outcome).observe(d)
        if rec.stream:
            ttft = rec.ttft_seconds
            if ttft is not None:
                self._ttft(model, route).observe(ttft)
            times = rec.token_times_ns
            if len(times) > 1:
                observe_many(self._itl(model, route),
                             [(b - a) / 1e9 for a, b in zip(times, times[1:])])
            if outcome == "ok":
                tpot = rec.tpot_seconds
                if tpot is not None:
                    self._tpot(model, route).observe(tpot)
        if rec.backend_queue_seconds is not None:
            self._queue(model, route).observe(rec.backend_queue_seconds)
        src = rec.token_count_source if rec.token_count_source != "none" else "backend"
        if rec.input_tokens:
            self._tokens(model, route, "input", "backend").inc(rec.input_tokens)
        if rec.output_tokens:
            self._tokens(model, route, "output", src).inc(rec.output_tokens)
        if rec.error_type in ("connect", "timeout", "upstream_status", "stream_broken"):
            self._upstream_errors(rec.error_type).inc()
        elif rec.error_type == "client_disconnect":
            self.client_cancels.inc()
