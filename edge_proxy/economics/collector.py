"""Prometheus export of the economics window statistics (scrape-time gauges).

Owns the gauge names, help texts and labels of :class:`~.stats.EconomicsStats`, and nothing
else: it computes no metric (:mod:`.stats` does, once per scrape) and keeps no state.
``describe()`` returns the same families as ``collect()`` (without samples), so a registry
refuses a second collector, or any other metric, exporting one of these names.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Iterator

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from edge_proxy.economics.stats import EconomicsStats, ModelStats

# (name, help, value): one gauge per model, label ``model``
_PER_MODEL: tuple[tuple[str, str, Callable[[ModelStats], float]], ...] = (
    ("edge_proxy_break_even_progress_ratio", "Requests served so far / N_break.",
     lambda s: s.break_even_progress),
    ("edge_proxy_fixed_cost_usd", "Fixed cost: adaptation + setup (+ cold starts in "
     "production mode).", lambda s: s.fixed_cost_usd),
    ("edge_proxy_intelligence_per_watt", "Quality score / mean power of the requests "
     "over the window [1/W].", lambda s: s.intelligence_per_watt),
    ("edge_proxy_system_density_tokens_per_second_per_gigabyte", "rho_sys: output "
     "tokens/s over the window / GB of weights.", lambda s: s.system_density),
    ("edge_proxy_cold_start_tax_energy_ratio", "C_tax: mean cold-start joules (last 100 cold "
     "starts) / mean request joules over the window (formulas.cold_start_tax_from_totals).",
     lambda s: s.cold_start_tax),
    ("edge_proxy_cold_start_tax_time_ratio", "C_tax (time): mean cold-start seconds / mean "
     "request seconds over the window.", lambda s: s.cold_start_time_ratio),
    ("edge_proxy_joules_per_request", "Mean full-attribution joules per user request "
     "over the window.", lambda s: s.joules_per_request),
)

# (name, help, (value, source)): label ``model`` and ``source``
_SOURCED: tuple[tuple[str, str, Callable[[ModelStats], tuple[float, str]]], ...] = (
    ("edge_proxy_break_even_requests", "N_break over the window: fixed cost / (API cost per "
     "request - local cost per request); +Inf when the API is not dearer. source: of C_train.",
     lambda s: (s.break_even_requests, s.break_even_source)),
    ("edge_proxy_intelligence_per_joule", "IPW: quality score / mean joules per request over "
     "the window [1/J]. source: of the score (estimated when the joules are).",
     lambda s: (s.intelligence_per_joule, s.intelligence_per_joule_source)),
    ("edge_proxy_quantization_fidelity_percent", "Q_ret: score / reference (FP16) score x 100 "
     "(evaluated: over the items both variants answered).",
     lambda s: (s.quantization_fidelity, s.quantization_fidelity_source)),
)

EMPTY = EconomicsStats(mode="", backend="", energy_source="none", energy_scope="none", prices=(),
                       models=())


def families(st: EconomicsStats) -> Iterator[GaugeMetricFamily]:
    """Every economics gauge family with ``st``'s samples (none for :data:`EMPTY`)."""
    from edge_proxy.energy.exporter import SOURCE_KIND

    for name, doc, pair in _SOURCED:
        g = GaugeMetricFamily(name, doc, labels=["model", "source"])
        for s in st.models:
            value, src = pair(s)
            g.add_metric([s.model, src], value)
        yield g
    for name, doc, fn in _PER_MODEL:
        g = GaugeMetricFamily(name, doc, labels=["model"])
        for s in st.models:
            g.add_metric([s.model], fn(s))
        yield g
    g = GaugeMetricFamily("edge_proxy_quality_static_score", "Configured quality score "
                          "(0..1).", labels=["model"])
    for s in st.models:
        if s.static_score is not None:
            g.add_metric([s.model], s.static_score)
    yield g
    g = GaugeMetricFamily("edge_proxy_model_weight_bytes", "Bytes of model weights: "
                          "measured (backend /info), configured, or nominal (paper table).",
                          labels=["model", "backend", "source"])
    for s in st.models:
        if not math.isnan(s.weight_gigabytes):
            g.add_metric([s.model, st.backend, s.weights_source], s.weight_gigabytes * 1e9)
    yield g
    g = GaugeMetricFamily(
        "edge_proxy_economics_sources_info", "Where each model's economics inputs come from "
        "(value 1): energy_source/energy_kind/energy_scope (joules of N_break, IPW, C_tax, cost, "
        "energy per request), score_source (feedback = user-submitted, probe, configured, none), "
        "weights_source (measured, configured, nominal).",
        labels=["model", "energy_source", "energy_kind", "energy_scope", "score_source",
                "weights_source"])
    for s in st.models:
        g.add_metric([s.model, st.energy_source, SOURCE_KIND.get(st.energy_source, "none"),
                      st.energy_scope, s.score_source, s.weights_source], 1.0)
    yield g
    g = GaugeMetricFamily("edge_proxy_economics_info", "Economics mode and prices.",
                          labels=["mode"])
    if st.mode:
        g.add_metric([st.mode], 1.0)
    yield g
    g = GaugeMetricFamily("edge_proxy_price_usd", "The configured price sheet.", labels=["item"])
    for item, v in st.prices:
        g.add_metric([item], v)
    yield g


class EconomicsCollector(Collector):
    """Exports what ``snapshot()`` computed; ``describe()`` names the same families."""

    def __init__(self, snapshot: Callable[[], EconomicsStats]) -> None:
        self.snapshot = snapshot

    def describe(self) -> Iterable[GaugeMetricFamily]:
        return list(families(EMPTY))

    def collect(self) -> Iterable[GaugeMetricFamily]:
        return list(families(self.snapshot()))


class ScrapeStart(Collector):
    """Runs ``hook`` at the start of every scrape (it exports nothing, so ``describe()`` is empty)."""

    def __init__(self, hook: Callable[[], None]) -> None:
        self.hook = hook

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> list[Any]:
        self.hook()
        return []
