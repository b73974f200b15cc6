"""Live economics: the request observer that turns every finished request into dollars.

Counters (exported per model, user traffic only; probes are kept out; :mod:`.counters`)::

    edge_proxy_energy_cost_usd_total{model}            full-attribution joules x PUE x USD/kWh
    edge_proxy_hardware_cost_usd_total{model}          GPU USD/hour x the request's busy-time share
    edge_proxy_api_equivalent_cost_usd_total{model}    real tokens x the API price sheet
    edge_proxy_economics_requests_total{model}
    edge_proxy_economics_tokens_total{model,type}      type = input | output
    edge_proxy_economics_energy_joules_total{model}    full-attribution joules of those requests
    edge_proxy_quality_score_sum / _count{model,source}  source = feedback | probe
    edge_proxy_economics_cold_starts_total{model}, ..._cold_start_energy_joules_total{model},
    ..._cold_start_seconds_total{model}, edge_proxy_cold_start_cost_usd_total{model}

Gauges, computed once per scrape over ``economics.window_seconds`` (:mod:`.stats`, exported by
:mod:`.collector`): N_break, IPW, rho_sys, C_tax, Q_ret and their inputs (docs/metrics.md).

Owns: what counts as served, each request's costs (with :mod:`.formulas`), feeding the window,
picking up finished cold starts from the cold-start gate it is given, and the wiring of the
quality inputs (:mod:`.feedback`, :mod:`.probes`, :mod:`.quality_results`) and the ``/info``
poller (:mod:`.info_poller`). Must not compute gauges or build Prometheus families itself.
"""
from __future__ import annotations

import asyncio
import math
import socket
import time
from typing import Any, Callable

from aiohttp import web
from prometheus_client import CollectorRegistry

from edge_proxy.config import ConfigError, Settings
from edge_proxy.economics import formulas as eco
from edge_proxy.economics import stats as st
from edge_proxy.economics.collector import EconomicsCollector, ScrapeStart
from edge_proxy.economics.components import ColdStartHistory, EnergyComponent
from edge_proxy.economics.counters import EconomicsCounters
from edge_proxy.economics.feedback import FeedbackEndpoint
from edge_proxy.economics.info_poller import InfoPoller
from edge_proxy.economics.probes import ProbeRunner, probe_model, proxy_url
from edge_proxy.economics.quality import GoldenPrompt, RecentRequests, load_golden_prompts
from edge_proxy.economics.quality_results import ResultsFiles
from edge_proxy.economics.window import (
    ALL_MODELS, BusyClock, ColdStartSample, EconomicsWindow, RequestSample, ScoreSample,
)
from edge_proxy.proxy.hooks import BaseObserver, RequestRecord


def served_by_backend(rec: RequestRecord) -> bool:
    """Whether economics counts this request as served (docs/metrics.md): a user request (not a
    probe) that ended ``ok``, or ``cancelled`` after the backend produced at least one output token.
    A request cancelled while held, before the backend's response headers, or before any token,
    was never answered: no request, tokens or joules in economics (its energy still shows in the
    energy totals)."""
    if rec.traffic == "probe":
        return False
    if rec.outcome == "ok":
        return True
    return rec.outcome == "cancelled" and (rec.t_first_token_ns is not None
                                           or bool(rec.output_tokens))


class EconomicsObserver(BaseObserver):
    """Request observer + cold-start sink + feedback endpoint + quality probes.

    ``coldstart``: the cold-start gate whose finished cold starts count (None: no gate);
    ``energy``: the energy component (None: energy off), for the sources of the joules."""

    def __init__(
        self,
        settings: Settings,
        registry: CollectorRegistry,
        clock_ns: Callable[[], int] = time.monotonic_ns,
        *,
        coldstart: ColdStartHistory | None = None,
        energy: EnergyComponent | None = None,
    ) -> None:
        self.settings = settings
        self.cfg = settings.economics
        if self.cfg.mode not in ("production", "paper"):
            raise ConfigError(f"economics.mode must be production or paper, got {self.cfg.mode!r}")
        if self.cfg.window_seconds <= 0:
            raise ConfigError("economics.window_seconds must be > 0")
        self.paper = self.cfg.mode == "paper"
        self.clock_ns = clock_ns
        self.backend = st.weights_backend_label(settings.proxy.backend_url, settings.energy.shared_path,
                                                socket.gethostname())
        self.coldstart = coldstart
        self.energy_component = energy
        self.runtime: Any = None                  # edge_proxy.proxy.server.ProxyRuntime (factory sets it)
        self._cold_ids: set[object] = set()
        self._busy = BusyClock()
        self.window = EconomicsWindow(lambda: self.cfg.window_seconds, clock_ns)
        self.recent = RecentRequests(self.cfg.feedback_capacity)
        self._touched: set[str] = set()
        self.info = InfoPoller(self.backend, lambda: self.cfg.info_poll_seconds)
        self._tasks: list[asyncio.Task[None]] = []
        # evaluation / adaptation results from edge-eval, re-read when the files change
        self.results_files = ResultsFiles(self.cfg.quality_results_path,
                                          self.cfg.adaptation_results_path,
                                          self.cfg.reference_models)
        self.golden: list[GoldenPrompt] = []
        if self.cfg.probes_path:
            self.golden = load_golden_prompts(self.cfg.probes_path)
        for model, spec in self.cfg.paper_model_sizes.items():
            st.paper_gigabytes(model, spec)      # validate early
        # Registered before the counters: a scrape first picks up cold starts finalized since the
        # last one, so the cold-start counters and the C_tax gauges of one scrape agree.
        registry.register(ScrapeStart(self.sync_cold_starts))
        self.m = EconomicsCounters(registry)
        self.feedback = FeedbackEndpoint(lambda: self.cfg.feedback_token, self.recent,
                                         self.m.feedback, self.record_score)
        self.probes = ProbeRunner(self.golden, lambda: proxy_url(self.runtime, self.settings),
                                  lambda: probe_model(self.runtime, self.backend_info),
                                  settings.proxy.model_name, self.m.probes, self.record_score)
        for model in sorted(set(self.cfg.scores) | set(self.cfg.reference_scores)):
            self._touch(model)          # configured models: their series exist from the start
        registry.register(EconomicsCollector(self.stats))

    @property
    def backend_info(self) -> dict[str, Any]:
        """The backend's last good ``/info`` answer (``{}`` before one)."""
        return self.info.info

    # ------------------------------------------------------------------ request hooks
    def on_request_start(self, rec: RequestRecord) -> None:
        if self.probes.claim(rec.client_request_id, rec.model):
            # Our own quality probe (its x-request-id is a random id we sent): label it so it
            # stays out of every user statistic.
            rec.traffic = "probe"
        rec.extra["economics.busy0"] = self._busy.start(self.clock_ns())
        if rec.traffic != "probe" and rec.model != "unknown":
            # (during a cold start the model is not known yet: on_request_end touches it then)
            self._touch(rec.model)

    def _touch(self, model: str) -> None:
        """Create the model's counter series at 0 as soon as the model is seen, so the first
        increments (which land when a request's energy is final) show in rate() and increase()."""
        if model not in self._touched:
            self._touched.add(model)
            self.m.touch(model, feedback=bool(self.cfg.feedback_token), probes=bool(self.golden))

    def on_request_end(self, rec: RequestRecord) -> None:
        started = rec.extra.get("economics.busy0")
        if isinstance(started, float):
            t = rec.t_end_ns if rec.t_end_ns is not None else self.clock_ns()
            rec.extra["economics.busy_share_seconds"] = self._busy.end(t, started)
        if served_by_backend(rec):
            self._touch(rec.model)
            # Known for feedback from the moment the answer is out, not only once its energy is
            # final (a tick later): a client may score a request right after reading it.
            self.recent.add(rec.request_id, rec.model, None)

    def sync_cold_starts(self) -> None:
        """Pick up finished (``ready``) cold starts from the cold-start gate's history."""
        if self.coldstart is None:
            return
        for cs in list(self.coldstart.history):
            # finalized: its energy window is closed (a cold start is in the history, ready, a
            # sampling tick or two before its energy is known; recorded earlier it would count 0 J)
            if cs.outcome != "ready" or not cs.finalized or cs.id in self._cold_ids:
                continue
            joules, _src = cs.tax_joules
            self.record_cold_start(None, joules, float(cs.seconds or 0.0), cold_start_id=cs.id)

    def on_request_final(self, rec: RequestRecord) -> None:
        self.sync_cold_starts()
        # Only user requests the backend answered: ok, or cancelled by the client mid-answer
        # (its tokens were produced and paid for). Failed and rejected requests are not
        # business traffic; their energy still shows in the energy component's totals.
        if not served_by_backend(rec):
            return
        model = rec.model
        n_in = rec.input_tokens or 0
        n_out = rec.output_tokens or 0
        joules = None
        if rec.energy is not None and rec.energy.source != "none":
            joules = max(0.0, rec.energy.full_joules)
        pue = 1.0 if self.paper else self.cfg.pue
        e_cost = eco.energy_cost_usd(joules or 0.0, self.cfg.usd_per_kwh, pue)
        share = rec.extra.get("economics.busy_share_seconds", 0.0)
        hw_cost = 0.0 if self.paper else eco.hardware_time_cost_usd(
            float(share) if isinstance(share, (int, float)) else 0.0, self.cfg.gpu_usd_per_hour)
        if self.paper:
            api = self.cfg.api_cost_per_request_usd
        else:
            api = eco.api_cost_usd(n_in, n_out, self.cfg.api_usd_per_million_input_tokens,
                                   self.cfg.api_usd_per_million_output_tokens)
        self.m.record_request(model, e_cost, hw_cost, api, n_in, n_out, joules or 0.0)
        self.window.add_request(model, RequestSample(
            self.clock_ns(), joules, n_in, n_out, e_cost + hw_cost, api,
            rec.duration_seconds or 0.0))
        self.recent.add(rec.request_id, model, joules)
        self.info.wake_if_unsettled()       # a request just succeeded: the backend is up again

    # ------------------------------------------------------------------ other inputs
    def record_cold_start(self, model: str | None, joules: float | None, seconds: float,
                          cold_start_id: object = None) -> None:
        """Record one finished cold start. ``model`` None: the backend's model (all models this
        proxy serves). ``joules`` None when no energy source covers it. ``cold_start_id``: the
        gate's id, so a cold start pushed here and also seen in the gate's history counts once."""
        if cold_start_id is not None:
            if cold_start_id in self._cold_ids:
                return
            self._cold_ids.add(cold_start_id)
        seconds = max(0.0, seconds)
        if joules is not None and joules < 0:
            joules = None
        cost = 0.0 if joules is None else eco.energy_cost_usd(
            joules, self.cfg.usd_per_kwh, 1.0 if self.paper else self.cfg.pue)
        self.window.add_cold_start(model or ALL_MODELS,
                                   ColdStartSample(self.clock_ns(), joules, seconds), cost)
        self.m.record_cold_start(model or self._default_model(), seconds, joules, cost)

    def record_score(self, model: str, score: float, source: str) -> None:
        """A quality score in 0..1 from ``feedback`` or ``probe``."""
        if not 0.0 <= score <= 1.0 or math.isnan(score):
            raise ValueError("score must be within 0..1")
        self.m.quality.labels(model, source).observe(score)
        self.window.add_score(model, ScoreSample(self.clock_ns(), score, source))

    # ------------------------------------------------------------------ window statistics
    def _default_model(self) -> str:
        if self.settings.proxy.model_name:
            return self.settings.proxy.model_name
        if len(self.window.served) == 1:
            return next(iter(self.window.served))
        served_by = getattr(getattr(self.runtime, "backend", None), "model", None)
        if served_by:
            return str(served_by)
        mid = self.backend_info.get("model_id")
        return str(mid) if mid else "unknown"

    def models(self) -> list[str]:
        names = self.window.models() | set(self.cfg.scores) | set(self.results_files.runs)
        return sorted(names)

    def stats(self) -> st.EconomicsStats:
        """Every model's statistics now: computed once (what one scrape exports)."""
        self.sync_cold_starts()
        self.results_files.refresh()
        comp = self.energy_component
        esrc = comp.source if comp is not None else None
        inp = st.Inputs(self.cfg, self.results_files, self.backend_info, esrc)
        escope = "none"
        if comp is not None:
            from edge_proxy.energy.exporter import source_scope
            escope = source_scope(comp.sampler.reader)
        return st.EconomicsStats(
            mode=self.cfg.mode, backend=self.backend, energy_source=esrc or "none",
            energy_scope=escope, prices=st.prices(self.cfg),
            models=tuple(st.compute(inp, self.window.view(m)) for m in self.models()))

    # ------------------------------------------------------------------ HTTP and background tasks
    def register_routes(self, app: web.Application) -> None:
        app.router.add_post("/edge/feedback", self.feedback.handle)

    async def on_startup(self, app: web.Application) -> None:
        self._tasks.append(self.info.task())
        if self.golden:
            self._tasks.append(asyncio.create_task(self.probes.run(
                lambda: self.cfg.probe_interval_seconds, self.cfg.probe_timeout_seconds)))

    async def on_cleanup(self, app: web.Application) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            try:
                await t
            except (asyncio.CancelledError, Exception):
                pass
        self._tasks.clear()


def create_economics(runtime: Any, *, coldstart: ColdStartHistory | None = None,
                     energy: EnergyComponent | None = None) -> EconomicsObserver:
    """Factory called by ``edge_proxy.proxy.server.build_proxy`` with the cold-start gate and the energy
    component it built (None: not enabled): creates the observer on the runtime's registry,
    appends it to ``runtime.observers``, registers ``POST /edge/feedback`` and the background
    tasks (backend /info poll, quality probes)."""
    obs = EconomicsObserver(runtime.settings, runtime.registry, coldstart=coldstart, energy=energy)
    obs.runtime = runtime
    runtime.observers.append(obs)
    runtime.components["economics"] = obs
    obs.register_routes(runtime.app)
    runtime.app.on_startup.append(obs.on_startup)
    runtime.app.on_cleanup.append(obs.on_cleanup)
    return obs
