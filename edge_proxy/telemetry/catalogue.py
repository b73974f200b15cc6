"""The catalogue of every Prometheus metric this repository exports: name, type, unit and label names.

Two exporters: the proxy (``edge-proxy serve``, prefix ``edge_proxy_``) and the model server
(``model-server serve``, prefix ``model_server_``). ``name`` is the name a query uses: counters end
in ``_total``; histograms and summaries are named without their ``_bucket`` / ``_sum`` / ``_count``
suffixes. prometheus_client also exports ``<family>_created`` (a gauge, the series' creation time)
for every counter, histogram and summary made with its ``Counter`` / ``Histogram`` / ``Summary``
classes; those are not listed.

``condition`` names when a family is registered at all (a key of :data:`CONDITIONS`); ``None``
means always. A registered family always appears in a scrape (its ``# TYPE`` line), even before
its first sample.

This module only lists: it must not create, register or read metrics. tests/test_metrics_catalogue.py
checks it against a live scrape of both exporters, docs/metrics.md, docs/model_server.md, the
Grafana dashboard and the recording rules.
"""
from __future__ import annotations

from dataclasses import dataclass

CONDITIONS: dict[str, str] = {
    "energy": "an energy source is on (energy.source is not none)",
    "coldstart": "hold mode is on (coldstart.hold or coldstart.spawn)",
    "config_file": "edge-proxy serve --config FILE (the price-sheet reloader)",
    "engine_steps": "the model server's engine counts its loop steps (fast engine)",
}
EXPORTERS = ("edge-proxy", "model-server")
TYPES = ("counter", "gauge", "histogram", "summary")


@dataclass(frozen=True)
class MetricSpec:
    """One exported metric family."""

    name: str                       # as queried (counters: ..._total)
    type: str                       # counter | gauge | histogram | summary
    unit: str                       # seconds, joules, watts, usd, bytes, requests, tokens, 1, ...
    labels: tuple[str, ...] = ()    # label names (histograms: without le; summaries: without quantile)
    component: str = "core"         # core | energy | economics | coldstart | model_server
    condition: str | None = None    # a key of CONDITIONS, or None: always exported

    @property
    def exporter(self) -> str:
        return "model-server" if self.name.startswith("model_server_") else "edge-proxy"

    @property
    def family(self) -> str:
        """The family name as prometheus_client's parser reports it (a counter without ``_total``)."""
        return self.name.removesuffix("_total") if self.type == "counter" else self.name

    @property
    def sample_names(self) -> tuple[str, ...]:
        """The names of its samples in a scrape (without ``_created``)."""
        if self.type == "histogram":
            return tuple(self.name + s for s in ("_bucket", "_sum", "_count"))
        if self.type == "summary":
            return (self.name, self.name + "_sum", self.name + "_count")
        return (self.name,)


def _m(name: str, type_: str, unit: str, labels: str = "", component: str = "core",
       condition: str | None = None) -> MetricSpec:
    return MetricSpec(name, type_, unit, tuple(x for x in labels.split(",") if x), component, condition)


_ECO, _EN, _CS, _MS = "economics", "energy", "coldstart", "model_server"

CATALOGUE: tuple[MetricSpec, ...] = (
    # ---- proxy core (edge_proxy/telemetry/metrics.py)
    _m("edge_proxy_requests_total", "counter", "requests", "model,backend,route,stream,status,outcome"),
    _m("edge_proxy_request_duration_seconds", "histogram", "seconds", "model,route,stream,outcome"),
    _m("edge_proxy_time_to_first_token_seconds", "histogram", "seconds", "model,route"),
    _m("edge_proxy_inter_token_latency_seconds", "histogram", "seconds", "model,route"),
    _m("edge_proxy_time_per_output_token_seconds", "histogram", "seconds", "model,route"),
    _m("edge_proxy_backend_queue_duration_seconds", "histogram", "seconds", "model,route"),
    _m("edge_proxy_tokens_total", "counter", "tokens", "model,route,type,source"),
    _m("edge_proxy_in_flight_requests", "gauge", "requests"),
    _m("edge_proxy_upstream_errors_total", "counter", "requests", "type"),
    _m("edge_proxy_client_disconnects_total", "counter", "requests"),
    _m("edge_proxy_process_errors_total", "counter", "errors", "type"),
    _m("edge_proxy_event_loop_lag_seconds", "histogram", "seconds"),
    _m("edge_proxy_gc_pause_seconds", "histogram", "seconds", "generation"),
    # ---- energy (edge_proxy/energy/exporter.py)
    _m("edge_proxy_gpu_energy_joules_total", "counter", "joules", "gpu_uuid,source", _EN, "energy"),
    _m("edge_proxy_gpu_power_watts", "gauge", "watts", "gpu_uuid", _EN, "energy"),
    _m("edge_proxy_attributed_energy_joules_total", "counter", "joules", "model,attribution", _EN, "energy"),
    _m("edge_proxy_attributed_full_energy_joules_total", "counter", "joules", "model,attribution", _EN, "energy"),
    _m("edge_proxy_idle_energy_joules_total", "counter", "joules", "", _EN, "energy"),
    _m("edge_proxy_foreign_energy_joules_total", "counter", "joules", "", _EN, "energy"),
    _m("edge_proxy_energy_unapportioned_joules", "gauge", "joules", "", _EN, "energy"),
    _m("edge_proxy_energy_sampler_lag_seconds", "gauge", "seconds", "", _EN, "energy"),
    _m("edge_proxy_energy_idle_power_watts", "gauge", "watts", "idle_power_source", _EN, "energy"),
    _m("edge_proxy_energy_sampler_errors_total", "counter", "reads", "", _EN, "energy"),
    _m("edge_proxy_energy_sampler_gaps_total", "counter", "ticks", "", _EN, "energy"),
    _m("edge_proxy_energy_source_info", "gauge", "1 (info)", "source,kind,scope", _EN, "energy"),
    _m("edge_proxy_request_energy_joules", "histogram", "joules", "model", _EN, "energy"),
    _m("edge_proxy_request_phase_energy_joules", "histogram", "joules", "model,phase", _EN, "energy"),
    # ---- economics: counters (edge_proxy/economics/live.py, reload.py)
    _m("edge_proxy_energy_cost_usd_total", "counter", "usd", "model", _ECO),
    _m("edge_proxy_hardware_cost_usd_total", "counter", "usd", "model", _ECO),
    _m("edge_proxy_api_equivalent_cost_usd_total", "counter", "usd", "model", _ECO),
    _m("edge_proxy_economics_requests_total", "counter", "requests", "model", _ECO),
    _m("edge_proxy_economics_tokens_total", "counter", "tokens", "model,type", _ECO),
    _m("edge_proxy_economics_energy_joules_total", "counter", "joules", "model", _ECO),
    _m("edge_proxy_quality_score", "summary", "1", "model,source", _ECO),
    _m("edge_proxy_quality_probes_total", "counter", "probes", "model,outcome", _ECO),
    _m("edge_proxy_feedback_total", "counter", "posts", "outcome", _ECO),
    _m("edge_proxy_economics_cold_starts_total", "counter", "cold starts", "model", _ECO),
    _m("edge_proxy_economics_cold_start_energy_joules_total", "counter", "joules", "model", _ECO),
    _m("edge_proxy_economics_cold_start_seconds_total", "counter", "seconds", "model", _ECO),
    _m("edge_proxy_cold_start_cost_usd_total", "counter", "usd", "model", _ECO),
    _m("edge_proxy_config_reloads_total", "counter", "reloads", "outcome", _ECO, "config_file"),
    # ---- economics: scrape-time gauges (edge_proxy/economics/live.py, quality_results.py)
    _m("edge_proxy_break_even_requests", "gauge", "requests", "model,source", _ECO),
    _m("edge_proxy_intelligence_per_joule", "gauge", "1/J", "model,source", _ECO),
    _m("edge_proxy_quantization_fidelity_percent", "gauge", "percent", "model,source", _ECO),
    _m("edge_proxy_break_even_progress_ratio", "gauge", "1", "model", _ECO),
    _m("edge_proxy_fixed_cost_usd", "gauge", "usd", "model", _ECO),
    _m("edge_proxy_intelligence_per_watt", "gauge", "1/W", "model", _ECO),
    _m("edge_proxy_system_density_tokens_per_second_per_gigabyte", "gauge", "tokens/s/GB", "model", _ECO),
    _m("edge_proxy_cold_start_tax_energy_ratio", "gauge", "1", "model", _ECO),
    _m("edge_proxy_cold_start_tax_time_ratio", "gauge", "1", "model", _ECO),
    _m("edge_proxy_joules_per_request", "gauge", "joules", "model", _ECO),
    _m("edge_proxy_quality_static_score", "gauge", "1", "model", _ECO),
    _m("edge_proxy_model_weight_bytes", "gauge", "bytes", "model,backend,source", _ECO),
    _m("edge_proxy_economics_sources_info", "gauge", "1 (info)",
       "model,energy_source,energy_kind,energy_scope,score_source,weights_source", _ECO),
    _m("edge_proxy_economics_info", "gauge", "1 (info)", "mode", _ECO),
    _m("edge_proxy_price_usd", "gauge", "usd", "item", _ECO),
    # ---- cold start (edge_proxy/coldstart/metrics.py)
    _m("edge_proxy_pending_requests", "gauge", "requests", "", _CS, "coldstart"),
    _m("edge_proxy_held_request_bytes", "gauge", "bytes", "", _CS, "coldstart"),
    _m("edge_proxy_held_requests_total", "counter", "requests", "", _CS, "coldstart"),
    _m("edge_proxy_cold_start_rejected_requests_total", "counter", "requests", "reason", _CS, "coldstart"),
    _m("edge_proxy_cold_starts_total", "counter", "cold starts", "outcome", _CS, "coldstart"),
    _m("edge_proxy_cold_start_duration_seconds", "histogram", "seconds", "phase", _CS, "coldstart"),
    _m("edge_proxy_cold_start_energy_joules", "histogram", "joules", "phase,source", _CS, "coldstart"),
    _m("edge_proxy_keep_warm_break_even_idle_seconds", "gauge", "seconds", "", _CS, "coldstart"),
    _m("edge_proxy_backend_process_up", "gauge", "1", "", _CS, "coldstart"),
    _m("edge_proxy_backend_process_exits_total", "counter", "exits", "outcome", _CS, "coldstart"),
    # ---- model server (model_server/metrics.py)
    _m("model_server_requests_total", "counter", "requests", "api,status", _MS),
    _m("model_server_finish_reason_total", "counter", "generations", "api,reason", _MS),
    _m("model_server_prompt_tokens_total", "counter", "tokens", "", _MS),
    _m("model_server_generation_tokens_total", "counter", "tokens", "", _MS),
    _m("model_server_in_flight_requests", "gauge", "requests", "", _MS),
    _m("model_server_queue_seconds", "histogram", "seconds", "", _MS),
    _m("model_server_prefill_seconds", "histogram", "seconds", "", _MS),
    _m("model_server_decode_seconds", "histogram", "seconds", "", _MS),
    _m("model_server_time_to_first_token_seconds", "histogram", "seconds", "", _MS),
    _m("model_server_request_duration_seconds", "histogram", "seconds", "", _MS),
    _m("model_server_batch_size", "histogram", "requests", "", _MS),
    _m("model_server_ready", "gauge", "1", "", _MS),
    _m("model_server_weight_bytes", "gauge", "bytes", "", _MS),
    _m("model_server_load_seconds", "gauge", "seconds", "", _MS),
    _m("model_server_load_energy_joules", "gauge", "joules", "", _MS),
    _m("model_server_engine_waiting_requests", "gauge", "requests", "", _MS),
    _m("model_server_engine_running_requests", "gauge", "requests", "", _MS),
    _m("model_server_engine_max_batch_size", "gauge", "requests", "", _MS),
    _m("model_server_engine_steps_total", "counter", "steps", "", _MS, "engine_steps"),
    _m("model_server_engine_prefill_calls_total", "counter", "passes", "", _MS, "engine_steps"),
    _m("model_server_engine_prefill_tokens_total", "counter", "tokens", "", _MS),
    _m("model_server_engine_decode_tokens_total", "counter", "tokens", "", _MS),
)


def by_name(exporter: str | None = None) -> dict[str, MetricSpec]:
    """The catalogue keyed by name (as queried), optionally of one exporter (see :data:`EXPORTERS`)."""
    return {m.name: m for m in CATALOGUE if exporter is None or m.exporter == exporter}


def by_family(exporter: str | None = None) -> dict[str, MetricSpec]:
    """The catalogue keyed by family name as prometheus_client's parser reports it."""
    return {m.family: m for m in CATALOGUE if exporter is None or m.exporter == exporter}


def owner_of_sample(sample: str) -> MetricSpec | None:
    """The catalogue entry a sample or query name belongs to (``x_bucket`` -> histogram ``x``)."""
    names = by_name()
    if sample in names:
        return names[sample]
    for suffix in ("_bucket", "_sum", "_count", "_created"):
        base = sample.removesuffix(suffix)
        for cand in (base, base + "_total"):
            m = names.get(cand)
            if m is not None and base != sample and (suffix == "_created" or sample in m.sample_names):
                return m
    return None
