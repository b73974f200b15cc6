"""Prometheus export of the sampler and the ledger.

A custom collector reads ONE ledger snapshot per scrape, so the totals in a scrape always satisfy

    sum(edge_proxy_gpu_energy_joules_total) ==
        sum(edge_proxy_attributed_energy_joules_total) + edge_proxy_idle_energy_joules_total
        + edge_proxy_foreign_energy_joules_total + edge_proxy_energy_unapportioned_joules

(float rounding aside). ``unapportioned`` is the energy of ticks measured but not split yet
(normally one or two ticks; more while a request's prompt-token count is awaited). ``foreign``
is the energy above idle power of ticks where the GPU was busy and none of this proxy's requests
was in flight (other replicas, direct clients, other tenants).
"""
from __future__ import annotations

from typing import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from edge_proxy.economics.metric_children import BatchHistogram
from edge_proxy.energy.ledger import Ledger
from edge_proxy.energy.observer import REQUEST_ENERGY_BUCKETS_JOULES
from edge_proxy.energy.sampler import Sampler
from edge_proxy.energy.window import SOURCE_KINDS


SOURCE_KIND = SOURCE_KINDS                  # one definition: edge_proxy.energy.window


def source_scope(reader: object) -> str:
    """What the source's joules cover: ``gpu`` (the whole card(s): every process on them),
    ``trace`` (a replayed recording), or the estimated source's scope (``backend-process-tree`` |
    ``whole-machine``)."""
    scope = getattr(reader, "scope", None)
    if isinstance(scope, str):
        return scope
    return {"replay": "trace"}.get(getattr(reader, "source", ""), "gpu")


class EnergyCollector(Collector):
    def __init__(self, ledger: Ledger, sampler: Sampler) -> None:
        self.ledger = ledger
        self.sampler = sampler

    def describe(self) -> list[Metric]:
        return list(self._metrics(describe_only=True))

    def collect(self) -> Iterator[Metric]:
        return self._metrics(describe_only=False)

    def _metrics(self, describe_only: bool) -> Iterator[Metric]:
        source = self.sampler.source
        gpu = CounterMetricFamily("edge_proxy_gpu_energy_joules", "Energy measured by the source per GPU "
                                  "(counter deltas; resets clamped to 0 J).", labels=["gpu_uuid", "source"])
        power = GaugeMetricFamily("edge_proxy_gpu_power_watts", "Latest instantaneous power per GPU.",
                                  labels=["gpu_uuid"])
        attr = CounterMetricFamily("edge_proxy_attributed_energy_joules", "Active energy attributed to "
                                   "requests (measured minus idle share, split by weight).",
                                   labels=["model", "attribution"])
        full = CounterMetricFamily("edge_proxy_attributed_full_energy_joules", "Full energy attributed to "
                                   "requests (active plus their share of idle power while they ran).",
                                   labels=["model", "attribution"])
        idle = CounterMetricFamily("edge_proxy_idle_energy_joules", "Idle share of the measured energy "
                                   "(min(dE, P_idle*dt) per busy tick; all of it when nothing is in flight).")
        unapp = GaugeMetricFamily("edge_proxy_energy_unapportioned_joules", "Measured energy of ticks "
                                  "not split over requests yet.")
        lag = GaugeMetricFamily("edge_proxy_energy_sampler_lag_seconds", "Age of the newest energy sample "
                                "when the sampler ingested it.")
        foreign = CounterMetricFamily("edge_proxy_foreign_energy_joules", "Energy above idle power of ticks "
                                      "where the GPU was busy and none of this proxy's requests was in flight "
                                      "(work the proxy does not see); never idle, never attributed.")
        pidle = GaugeMetricFamily("edge_proxy_energy_idle_power_watts", "Idle power P_idle the ledger uses; "
                                  "idle_power_source: configured | learned_at_rest (ticks at GPU utilization 0) | "
                                  "learned_no_requests (source cannot tell: ticks with nothing in flight) | "
                                  "default (0 W, nothing learned yet).", labels=["idle_power_source"])
        errors = CounterMetricFamily("edge_proxy_energy_sampler_errors", "Failed reads of the energy source.")
        gaps = CounterMetricFamily("edge_proxy_energy_sampler_gaps", "Ticks marked as gaps (failed reads, "
                                   "counter resets or wraps).")
        info = GaugeMetricFamily("edge_proxy_energy_source_info", "Energy source in use (value 1): "
                                 "source (nvml|remote|replay|estimated), kind (measured|replayed|estimated) "
                                 "and scope (what it covers).", labels=["source", "kind", "scope"])
        if not describe_only:
            t = self.ledger.snapshot()
            s = self.sampler.snapshot()
            uuids = list(dict.fromkeys([*self.sampler.reader.gpu_uuids, *t.measured_by_gpu]))
            for u in uuids:
                gpu.add_metric([u, source], t.measured_by_gpu.get(u, 0.0))
            for u, p in s["power_watts"].items():  # type: ignore[union-attr]
                power.add_metric([u], p)
            for (model, method), (a, f) in sorted(t.by_model.items()):
                attr.add_metric([model, method], a)
                full.add_metric([model, method], f)
            idle.add_metric([], t.idle_joules)
            foreign.add_metric([], t.foreign_joules)
            unapp.add_metric([], t.pending_joules)
            lag.add_metric([], float(s["lag_seconds"]))  # type: ignore[arg-type]
            pidle.add_metric([t.idle_power_source], float(t.idle_watts or 0.0))
            errors.add_metric([], float(s["errors_total"]))  # type: ignore[arg-type]
            gaps.add_metric([], float(s["gaps_total"]))  # type: ignore[arg-type]
            info.add_metric([source, SOURCE_KIND.get(source, "unknown"), source_scope(self.sampler.reader)], 1.0)
        yield from (gpu, power, attr, full, idle, foreign, unapp, lag, pidle, errors, gaps, info)


def register_energy_metrics(registry: CollectorRegistry, ledger: Ledger, sampler: Sampler) -> BatchHistogram:
    """Register the collector; return the per-request energy histogram (observed at finalize; a
    ``BatchHistogram``: the requests one tick settles are observed in one step, with the exposition
    of ``prometheus_client.Histogram``)."""
    registry.register(EnergyCollector(ledger, sampler))
    return BatchHistogram("edge_proxy_request_energy_joules", "Full energy attributed to one request (J), "
                          "observed when the request is finalized.", ["model"],
                          buckets=REQUEST_ENERGY_BUCKETS_JOULES, registry=registry)


def register_phase_histogram(registry: CollectorRegistry) -> BatchHistogram:
    """Per-request energy by phase (prefill | decode; see docs/metrics.md)."""
    return BatchHistogram("edge_proxy_request_phase_energy_joules", "Full energy of one request's prefill "
                          "(streams: the ticks up to the one holding its first token; one response: by its prompt "
                          "and output token weights) or decode (the rest), observed when the request is finalized.",
                          ["model", "phase"], buckets=REQUEST_ENERGY_BUCKETS_JOULES, registry=registry)
