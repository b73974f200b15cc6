"""Cold-start recording: open a :class:`ColdStart` record, note what the readiness probe and the
backend's ``/info`` report, and finish it: phase durations, the energy window over
``[hold_start, first_token)`` (``first_token`` or, without one, ``ready``), the tax, the span.

Energy: the energy component's ticks through :class:`~edge_proxy.energy.window.EnergyWindows`,
read once a tick reaches the window's end (the sampler closes a tick about one period after its end,
later on a loaded host; at most ``TICK_WAIT_S``). A window whose ticks cover less than half of it has
no measured energy (the tax then falls back to the model server's own load energy).

Owns: the current record, the history of finished ones, the recent warm requests (tax inputs),
the duration/energy histograms, the keep-warm break-even gauge and the ``cold_starts`` counter
(the C_tax gauges are economics': it reads the finished records from ``gate.history``).
Must not: hold or release requests, start or stop processes, or decide when a cold start begins
or ends.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from typing import Any

from edge_proxy.coldstart.clock import epoch_to_monotonic_ns
from edge_proxy.coldstart.metrics import ColdStartMetrics
from edge_proxy.coldstart.phases import ColdStartTimeline, segment_seconds
from edge_proxy.coldstart.probe import ProbeResult
from edge_proxy.coldstart.record import ColdStart
from edge_proxy.coldstart.span import emit_span
from edge_proxy.coldstart.tax import RecentRequests, idle_watts, update_tax
from edge_proxy.energy.window import EnergyWindows, Measurement

log = logging.getLogger("edge_proxy.coldstart")

MIN_ENERGY_COVERAGE = 0.5          # below this share of the window covered by ticks: no measured energy
TICK_WAIT_S = 2.0                  # longest wait for the tick that closes a cold start's window


class ColdStartRecorder:
    """Records cold starts. ``energy``: the energy component, or a callable returning it (looked
    up when a cold start ends, so the order of the proxy's factories does not matter)."""

    def __init__(self, metrics: ColdStartMetrics, tracer: Any = None, backend_url: str = "",
                 energy: Any = None, idle_watts_configured: float | None = None,
                 history_size: int = 50) -> None:
        self.m = metrics
        self.tracer = tracer
        self.backend_url = backend_url
        self._energy = energy
        self._idle_watts_configured = idle_watts_configured
        self._ids = itertools.count(1)
        self.current: ColdStart | None = None       # in progress or awaiting its first token
        self.history: deque[ColdStart] = deque(maxlen=history_size)
        self.recent = RecentRequests()

    @property
    def energy(self) -> Any:
        e = self._energy
        return e() if callable(e) and not hasattr(e, "source") else e

    # ------------------------------------------------------------------ open and note
    def begin(self, reason: str, hold_start_ns: int, held: int) -> ColdStart:
        cs = ColdStart(id=next(self._ids), reason=reason, timeline=ColdStartTimeline(hold_start=hold_start_ns),
                       held_max=held)
        self.current = cs
        log.info("cold start %d begins (%s); %d request(s) held", cs.id, reason, held)
        return cs

    @staticmethod
    def note_probe(cs: ColdStart, pr: ProbeResult) -> None:
        """Milestones from one probe: ``listening`` (observed) and the backend's ``/info`` startup
        timeline (epoch seconds, put on the monotonic clock) and load energy."""
        tl = cs.timeline
        if pr.listening and tl.listening is None:
            tl.set("listening", pr.t_ns, "proxy")
        info = pr.info
        if isinstance(info, dict):
            le = info.get("load_energy_joules")
            if isinstance(le, (int, float)):
                cs.load_energy_joules = float(le)
            startup = info.get("startup")
            if isinstance(startup, dict) and pr.clock is not None:
                for key, val in startup.items():
                    if isinstance(val, (int, float)):
                        cs.backend_startup[key] = float(val)
                        cs.backend_milestones_ns[key] = epoch_to_monotonic_ns(float(val), pr.clock)
                bm = cs.backend_milestones_ns
                if "process_start" in bm:
                    tl.set("process_start", bm["process_start"], "backend")
                for key in ("load_start", "load_end"):
                    if key in bm:
                        tl.set(key, bm[key], "backend", overwrite=True)

    def mark_ready(self, cs: ColdStart, t_ns: int) -> None:
        tl = cs.timeline
        tl.set("ready", t_ns, "proxy")
        # The model server listens before it loads; polling sees it late. Cap at load_start.
        if tl.listening is not None and tl.load_start is not None and tl.listening > tl.load_start:
            tl.set("listening", tl.load_start, "backend(load_start)", overwrite=True)
        cs.outcome = "ready"
        self.m.cold_starts.labels(outcome="ready").inc()
        log.info("cold start %d: backend ready after %.2f s", cs.id, (t_ns - tl.hold_start) / 1e9)

    def mark_failed(self, cs: ColdStart, outcome: str, message: str) -> None:
        cs.outcome = outcome
        cs.error = message
        self.m.cold_starts.labels(outcome=outcome).inc()

    # ------------------------------------------------------------------ finish
    async def finalize(self, cs: ColdStart) -> None:
        if cs.finalized:
            return
        cs.finalized = True
        end = cs.end_ns
        if cs.outcome == "ready" and end is not None:
            for phase, secs in segment_seconds(cs.timeline).items():
                self.m.duration.labels(phase=phase).observe(secs)
            cs.energy = await self._measure(cs, end)
            if cs.energy is not None:
                self.m.energy.labels(phase="total", source=cs.energy.source).observe(cs.energy.joules)
            if cs.load_energy_joules is not None:
                self.m.energy.labels(phase="load", source="model_server").observe(cs.load_energy_joules)
            self.update_tax(cs)
        self.history.append(cs)
        emit_span(self.tracer, cs, self.backend_url)

    async def _measure(self, cs: ColdStart, end_ns: int) -> Measurement | None:
        energy = self.energy
        if energy is None or not hasattr(energy, "ticks_between"):
            return None
        # The energy component closes a tick ~one period after it ends; on a loaded host later. Wait for a
        # tick that reaches the window's end, at most TICK_WAIT_S (a window the ticks never reach falls back).
        period = max(0.001, float(getattr(energy, "period_seconds", 0.1) or 0.1))
        deadline = time.monotonic() + max(2 * period, TICK_WAIT_S)
        await asyncio.sleep(2 * period)
        while time.monotonic() < deadline and not any(
                t.t1_ns >= end_ns for t in energy.ticks_between(end_ns - 1, end_ns)):
            await asyncio.sleep(period)
        try:
            m = EnergyWindows(energy).measure(cs.timeline.hold_start, end_ns, name=f"cold_start_{cs.id}")
        except Exception:
            log.exception("cold start: energy lookup failed")
            return None
        return m if m.joules_if_covered(MIN_ENERGY_COVERAGE) is not None else None

    def update_tax(self, cs: ColdStart) -> None:
        """The record's tax fields and the keep-warm break-even gauge. C_tax itself is exported by
        economics (one definition, per model, over its window), not from here."""
        update_tax(cs, self.recent, idle_watts(self.energy, self._idle_watts_configured))
        if cs.break_even_idle_seconds is not None:
            self.m.break_even.set(cs.break_even_idle_seconds)

    def last_ready(self) -> ColdStart | None:
        for cs in reversed(self.history):
            if cs.outcome == "ready":
                return cs
        return None
