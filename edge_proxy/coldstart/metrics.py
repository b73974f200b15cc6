"""Prometheus instruments of the cold-start component (one set per proxy registry)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Cold starts of LLM servers run from about a second (tiny model, warm page cache) to minutes
# (8B weights from network storage, compile, warm-up): buckets up to 600 s.
COLD_START_BUCKETS_SECONDS: tuple[float, ...] = (
    0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0, 180.0, 240.0, 300.0,
    450.0, 600.0,
)
COLD_START_BUCKETS_JOULES: tuple[float, ...] = (
    1.0, 10.0, 30.0, 100.0, 300.0, 1000.0, 3000.0, 10000.0, 30000.0, 100000.0,
)
OUTCOMES = ("ready", "timeout", "error")
REJECT_REASONS = ("hold_full", "hold_timeout", "spawn_failed", "draining")
PROCESS_EXIT_OUTCOMES = ("idle_stop", "crash", "start_failed", "shutdown")


class ColdStartMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.pending = Gauge(
            "edge_proxy_pending_requests",
            "Requests held by the proxy while the backend is not ready (scale-from-zero signal for KEDA/HPA).",
            registry=registry,
        )
        self.held_bytes = Gauge(
            "edge_proxy_held_request_bytes",
            "Request-body bytes of the requests held right now (bounded by coldstart.max_held_bytes).",
            registry=registry,
        )
        self.held = Counter(
            "edge_proxy_held_requests_total",
            "Requests that were held while the backend was not ready and later released to it.",
            registry=registry,
        )
        self.rejected = Counter(
            "edge_proxy_cold_start_rejected_requests_total",
            "Held requests answered 503 by the proxy: hold_full (max pending or max held bytes), hold_timeout (max wait), spawn_failed, draining (handed back on shutdown with Retry-After).",
            ["reason"], registry=registry,
        )
        self.cold_starts = Counter(
            "edge_proxy_cold_starts_total",
            "Cold starts by outcome: ready, timeout (not ready within max wait), error (backend failed to start).",
            ["outcome"], registry=registry,
        )
        self.duration = Histogram(
            "edge_proxy_cold_start_duration_seconds",
            "Cold-start phase durations (phase: spawn, listen, init, load, warmup, first_token, to_ready, total).",
            ["phase"], buckets=COLD_START_BUCKETS_SECONDS, registry=registry,
        )
        self.energy = Histogram(
            "edge_proxy_cold_start_energy_joules",
            "Energy of cold starts: phase=total measured by the proxy's energy source from hold start to "
            "first token; phase=load as reported by the model server (load_energy_joules).",
            ["phase", "source"], buckets=COLD_START_BUCKETS_JOULES, registry=registry,
        )
        # C_tax is exported by economics (edge_proxy.economics.formulas.cold_start_tax_from_totals).
        self.break_even = Gauge(
            "edge_proxy_keep_warm_break_even_idle_seconds",
            "Last cold start's energy divided by idle power: idle gaps longer than this save energy by scaling to zero.",
            registry=registry,
        )
        self.process_up = Gauge(
            "edge_proxy_backend_process_up",
            "1 while the supervised backend process is running (local --spawn mode).",
            registry=registry,
        )
        self.process_exits = Counter(
            "edge_proxy_backend_process_exits_total",
            "Exits of the supervised backend process: idle_stop, crash, start_failed, shutdown.",
            ["outcome"], registry=registry,
        )
        for g in (self.break_even,):
            g.set(float("nan"))          # unknown until a cold start and warm requests were measured
        for o in OUTCOMES:
            self.cold_starts.labels(outcome=o)
        for r in REJECT_REASONS:
            self.rejected.labels(reason=r)
        for o in PROCESS_EXIT_OUTCOMES:
            self.process_exits.labels(outcome=o)
