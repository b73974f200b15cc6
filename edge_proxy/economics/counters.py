"""Prometheus counters of economics (per model, user traffic only), and their recording.

Owns the counter names, help texts and label sets, and series creation at 0. Must not decide what
counts as served or compute a cost (the observer does, with :mod:`.formulas`): it only records.
"""
from __future__ import annotations

from types import SimpleNamespace

from prometheus_client import CollectorRegistry, Counter, Summary

from edge_proxy.economics.metric_children import Children

# label values known up front (their series are created at 0: the first increment shows in rate())
FEEDBACK_OUTCOMES = ("accepted", "bad_request", "disabled", "unauthorized", "unknown_request")
PROBE_OUTCOMES = ("pass", "fail", "error")


class EconomicsCounters:
    def __init__(self, registry: CollectorRegistry) -> None:
        m = ("model",)
        self.energy_cost = Counter("edge_proxy_energy_cost_usd", "Electricity cost of user "
                                   "requests: full-attribution joules x PUE x USD/kWh.", m,
                                   registry=registry)
        self.hardware_cost = Counter("edge_proxy_hardware_cost_usd", "Hardware-time cost of user "
                                     "requests: GPU USD/hour x each request's busy-time share.", m,
                                     registry=registry)
        self.api_cost = Counter("edge_proxy_api_equivalent_cost_usd", "What the API would have "
                                "charged for the same requests (real tokens x API price sheet; "
                                "paper mode: flat USD per request).", m, registry=registry)
        self.requests = Counter("edge_proxy_economics_requests", "User requests counted by "
                                "economics: outcome ok, or cancelled after the backend produced "
                                "tokens; probes excluded.", m,
                                registry=registry)
        self.tokens = Counter("edge_proxy_economics_tokens", "Tokens of user requests counted by "
                              "economics.", ("model", "type"), registry=registry)
        self.energy = Counter("edge_proxy_economics_energy_joules", "Full-attribution energy of "
                              "user requests counted by economics (before PUE).", m,
                              registry=registry)
        self.quality = Summary("edge_proxy_quality_score", "Quality scores (0..1) from feedback "
                               "and probes.", ("model", "source"), registry=registry)
        self.probes = Counter("edge_proxy_quality_probes", "Quality probes sent, by outcome.",
                              ("model", "outcome"), registry=registry)
        self.feedback = Counter("edge_proxy_feedback", "Feedback posts, by outcome.",
                                ("outcome",), registry=registry)
        self.cold_starts = Counter("edge_proxy_economics_cold_starts", "Cold starts reported to "
                                   "economics.", m, registry=registry)
        self.cold_energy = Counter("edge_proxy_economics_cold_start_energy_joules", "Energy of "
                                   "cold starts reported to economics.", m, registry=registry)
        self.cold_seconds = Counter("edge_proxy_economics_cold_start_seconds", "Duration of cold "
                                    "starts reported to economics.", m, registry=registry)
        self.cold_cost = Counter("edge_proxy_cold_start_cost_usd", "Electricity cost of cold "
                                 "starts (part of the fixed cost in production mode).", m,
                                 registry=registry)
        for outcome in FEEDBACK_OUTCOMES:   # known up front: every series starts at 0
            self.feedback.labels(outcome)
        # per-request counters: label children looked up once (see metric_children)
        self.children = SimpleNamespace(**{name: Children(getattr(self, name)) for name in (
            "energy_cost", "hardware_cost", "api_cost", "requests", "tokens", "energy")})

    def touch(self, model: str, feedback: bool, probes: bool) -> None:
        """Create the model's series at 0."""
        for c in (self.energy_cost, self.hardware_cost, self.api_cost, self.requests, self.energy,
                  self.cold_starts, self.cold_energy, self.cold_seconds, self.cold_cost):
            c.labels(model)
        self.tokens.labels(model, "input")
        self.tokens.labels(model, "output")
        if feedback:
            self.quality.labels(model, "feedback")
        if probes:
            self.quality.labels(model, "probe")
            for outcome in PROBE_OUTCOMES:
                self.probes.labels(model, outcome)

    def record_request(self, model: str, energy_cost_usd: float, hardware_cost_usd: float,
                       api_cost_usd: float, input_tokens: int, output_tokens: int,
                       joules: float) -> None:
        ch = self.children
        ch.energy_cost(model).inc(energy_cost_usd)
        ch.hardware_cost(model).inc(hardware_cost_usd)
        ch.api_cost(model).inc(api_cost_usd)
        ch.requests(model).inc()
        ch.tokens(model, "input").inc(input_tokens)
        ch.tokens(model, "output").inc(output_tokens)
        ch.energy(model).inc(joules)

    def record_cold_start(self, model: str, seconds: float, joules: float | None,
                          cost_usd: float) -> None:
        self.cold_starts.labels(model).inc()
        self.cold_seconds.labels(model).inc(seconds)
        if joules is not None:
            self.cold_energy.labels(model).inc(joules)
            self.cold_cost.labels(model).inc(cost_usd)
