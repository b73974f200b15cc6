"""Hold mode: a BackendGate that holds requests while the backend is not ready, drives the cold
start (spawning the backend when a local supervisor is configured), and records its phases.

One object plays three roles, all on the event loop:

* :class:`~edge_proxy.proxy.hooks.BackendGate`: ``acquire`` returns at once while the backend is ready;
  otherwise the request joins a bounded FIFO (``max_pending``) and waits at most ``max_wait``
  seconds, after which it gets :class:`~edge_proxy.proxy.hooks.GateRejected` (the proxy answers 503).
* the cold-start driver: one background task per cold start polls readiness, starts the backend
  (``--spawn``), and releases the held requests in bursts of ``release_burst``.
* the drain on shutdown (SIGTERM): new requests get 503 + ``Retry-After`` at once; requests held
  for a cold start in progress wait up to ``drain_seconds`` for it to release them (they then finish
  normally; not with ``--spawn``, whose backend stops with the proxy), the rest are handed back with 503 + ``Retry-After`` (reason ``draining``), so a client
  that retries reaches another gateway replica instead of failing.
* held bodies are bounded twice: ``max_pending`` requests and ``max_held_bytes`` request bytes.
* a :class:`~edge_proxy.proxy.hooks.RequestObserver`: counts requests in flight (idle stop never cuts a
  running request), sees the first token of the first released request (last phase), and keeps the
  recent warm requests' energy and duration for the cold-start tax.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import statistics
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from edge_proxy import economics
from edge_proxy.coldstart.clock import ClockPair, epoch_to_monotonic_ns, monotonic_to_epoch_ns
from edge_proxy.coldstart.energy_window import idle_watts, joules_between, source_name
from edge_proxy.coldstart.metrics import ColdStartMetrics
from edge_proxy.coldstart.phases import MILESTONES, ColdStartTimeline, segment_seconds
from edge_proxy.coldstart.probe import ProbeResult, ReadinessProbe
from edge_proxy.coldstart.supervisor import BackendSupervisor, SpawnError
from edge_proxy.config import ColdStartSettings
from edge_proxy.proxy.hooks import BaseObserver, GateRejected, RequestRecord

log = logging.getLogger("edge_proxy.coldstart")

COLD_START_ID_KEY = "cold_start_id"
REQUEST_BYTES_KEY = "request_bytes"       # rec.extra: the request body's size, set by the proxy


@dataclass
class ColdStart:
    """One cold start: its milestones, outcome, energy and tax."""

    id: int
    reason: str                                  # request | restart
    timeline: ColdStartTimeline
    outcome: str | None = None                   # ready | timeout | error
    error: str | None = None
    backend_startup: dict[str, Any] = field(default_factory=dict)    # /info startup (epoch s)
    backend_milestones_ns: dict[str, int] = field(default_factory=dict)
    load_energy_joules: float | None = None      # model server's own measurement (/info)
    energy_joules: float | None = None           # proxy's source over hold_start -> end
    energy_source: str = "none"
    released: int = 0
    open_requests: int = 0
    held_max: int = 0
    finalized: bool = False
    tax_energy_ratio: float | None = None
    tax_time_ratio: float | None = None
    break_even_idle_seconds: float | None = None
    median_request_joules: float | None = None
    median_request_seconds: float | None = None
    idle_watts: float | None = None

    @property
    def end_ns(self) -> int | None:
        return self.timeline.first_token or self.timeline.ready

    @property
    def seconds(self) -> float | None:
        e = self.end_ns
        return None if e is None else (e - self.timeline.hold_start) / 1e9

    @property
    def tax_joules(self) -> tuple[float | None, str]:
        """Energy used for the tax: measured over the whole cold start, else the server's load energy."""
        if self.energy_joules is not None:
            return self.energy_joules, self.energy_source
        if self.load_energy_joules is not None:
            return self.load_energy_joules, "model_server_load"
        return None, "none"

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "reason": self.reason,
            "outcome": self.outcome,
            "error": self.error,
            "milestones_seconds": self.timeline.offsets_seconds(),
            "milestone_sources": dict(self.timeline.sources),
            "phases_seconds": segment_seconds(self.timeline),
            "seconds": self.seconds,
            "backend_startup_epoch_seconds": self.backend_startup,
            "energy_joules": self.energy_joules,
            "energy_source": self.energy_source,
            "load_energy_joules": self.load_energy_joules,
            "released_requests": self.released,
            "held_max": self.held_max,
            "median_request_joules": self.median_request_joules,
            "median_request_seconds": self.median_request_seconds,
            "idle_watts": self.idle_watts,
            "tax_energy_ratio": self.tax_energy_ratio,
            "tax_time_ratio": self.tax_time_ratio,
            "keep_warm_break_even_idle_seconds": self.break_even_idle_seconds,
        }


@dataclass
class _Waiter:
    rec: RequestRecord
    fut: asyncio.Future[ColdStart | None]
    t_enq_ns: int
    nbytes: int = 0


def _median(values: deque[float]) -> float | None:
    return statistics.median(values) if values else None


def _finite(x: float | None) -> float | None:
    if x is None or x != x or x in (float("inf"), float("-inf")):
        return None
    return x


class ColdStartGate(BaseObserver):
    """BackendGate + cold-start driver + observer. Create inside a running loop or call
    :meth:`start` from the app's ``on_startup``; call :meth:`close` from ``on_cleanup``."""

    def __init__(
        self,
        settings: ColdStartSettings,
        backend_url: str,
        metrics: ColdStartMetrics,
        tracer: Any = None,
        energy: Any = None,
        idle_watts_configured: float | None = None,
        history_size: int = 50,
    ) -> None:
        from urllib.parse import urlsplit

        self.s = settings
        self.m = metrics
        self.tracer = tracer
        self._energy = energy              # the energy component, or a callable returning it
        self._idle_watts_configured = idle_watts_configured
        self.backend_url = backend_url
        self.probe = ReadinessProbe(backend_url, timeout_seconds=max(0.5, min(2.0, settings.readiness_poll_seconds * 10)))
        self.supervisor: BackendSupervisor | None = None
        if settings.spawn:
            u = urlsplit(backend_url)
            self.supervisor = BackendSupervisor(
                settings.spawn,
                host=u.hostname or "127.0.0.1",
                port=u.port or (443 if u.scheme == "https" else 80),
                stop_grace_seconds=settings.stop_grace_seconds,
                backoff_base_seconds=settings.restart_backoff_seconds,
                backoff_max_seconds=settings.restart_backoff_max_seconds,
                on_exit=self._on_process_exit,
                output=settings.backend_log,
            )
        self._ready = False            # spawn: no process yet; hold: unknown until the first probe
        self._waiters: deque[_Waiter] = deque()
        self._driver: asyncio.Task[None] | None = None
        self._idle_task: asyncio.Task[None] | None = None
        self._bg: set[asyncio.Task[Any]] = set()
        self._ids = itertools.count(1)
        self.current: ColdStart | None = None       # in progress or awaiting its first token
        self.history: deque[ColdStart] = deque(maxlen=history_size)
        self.in_flight = 0
        self._last_activity_ns = time.monotonic_ns()
        self._req_joules: deque[float] = deque(maxlen=512)
        self._req_seconds: deque[float] = deque(maxlen=512)
        self._tax_refresh_ns = 0
        self._closing = False
        self.held_bytes = 0

    @property
    def energy(self) -> Any:
        e = self._energy
        return e() if callable(e) and not hasattr(e, "source") else e

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        if self.supervisor is not None and self.s.idle_timeout_seconds:
            self._idle_task = asyncio.create_task(self._idle_loop(), name="coldstart-idle")

    async def shutdown(self) -> None:
        """Drain (app ``on_shutdown``: the listener is already closed, before the server waits for
        open handlers). New requests are refused with 503 + Retry-After; requests held for a cold
        start in progress get up to ``drain_seconds`` to be released to the backend (they then
        finish normally); whatever is still held is handed back with 503 + Retry-After."""
        self._closing = True
        # With --spawn the backend stops with this proxy: nothing to wait for.
        deadline = time.monotonic() + (self.s.drain_seconds if self.supervisor is None else 0.0)
        while self._waiters and self._driver is not None and not self._driver.done() \
                and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self._waiters:
            log.warning("shutting down: handing %d held requests back (503, Retry-After %d s)",
                        len(self._waiters), self.s.retry_after_seconds)
        if self._driver is not None and not self._driver.done():
            self._driver.cancel()
            await asyncio.gather(self._driver, return_exceptions=True)
        self._reject_all("draining", "the proxy is shutting down; retry (another replica serves it)",
                         self.s.retry_after_seconds)

    async def close(self) -> None:
        self._closing = True
        for t in (self._idle_task, self._driver):
            if t is not None and not t.done():
                t.cancel()
        for t in (self._idle_task, self._driver):
            if t is not None:
                await asyncio.gather(t, return_exceptions=True)
        self._reject_all("draining", "the proxy is shutting down; retry (another replica serves it)",
                         self.s.retry_after_seconds)
        if self.supervisor is not None:
            was_running = self.supervisor.running
            await self.supervisor.close()
            if was_running:
                self.m.process_exits.labels(outcome="shutdown").inc()
            self.m.process_up.set(0)
        for t in list(self._bg):
            t.cancel()
        await asyncio.gather(*self._bg, return_exceptions=True)
        await self.probe.close()

    @property
    def pending(self) -> int:
        return len(self._waiters)

    @property
    def ready(self) -> bool:
        return self._ready

    # ------------------------------------------------------------------ BackendGate
    async def acquire(self, rec: RequestRecord) -> None:
        now = time.monotonic_ns()
        self._last_activity_ns = now
        if self._ready and not self._waiters:
            return
        if self._closing:
            self.m.rejected.labels(reason="draining").inc()
            raise GateRejected("draining", "the proxy is shutting down; retry (another replica serves it)",
                               self.s.retry_after_seconds)
        if len(self._waiters) >= self.s.max_pending:
            self.m.rejected.labels(reason="hold_full").inc()
            raise GateRejected(
                "hold_full",
                f"the backend is starting and {len(self._waiters)} requests are already waiting "
                f"(max pending {self.s.max_pending}); retry later", self.s.retry_after_seconds,
            )
        nbytes = rec.extra.get(REQUEST_BYTES_KEY, 0)
        nbytes = nbytes if isinstance(nbytes, int) else 0
        if self.held_bytes + nbytes > self.s.max_held_bytes:
            self.m.rejected.labels(reason="hold_full").inc()
            raise GateRejected(
                "hold_full",
                f"the backend is starting and {self.held_bytes} request bytes are already held "
                f"(max held bytes {self.s.max_held_bytes}); retry later", self.s.retry_after_seconds,
            )
        w = _Waiter(rec, asyncio.get_running_loop().create_future(), now, nbytes)
        self._waiters.append(w)
        self.held_bytes += nbytes
        self._set_pending()
        if self.current is not None and not self.current.finalized:
            self.current.held_max = max(self.current.held_max, len(self._waiters))
        self._ensure_driver()
        try:
            # The driver rejects everything held when the cold start passes max wait (so counters
            # and the 503s agree); this per-request limit is the safety net behind it.
            done, _ = await asyncio.wait({w.fut}, timeout=self.s.max_wait_seconds + 1.0)
        except asyncio.CancelledError:
            self._remove(w)
            if not w.fut.done():
                w.fut.cancel()
            raise
        if not done:
            self._remove(w)
            w.fut.cancel()
            self.m.rejected.labels(reason="hold_timeout").inc()
            raise GateRejected(
                "hold_timeout",
                f"the backend did not become ready within {self.s.max_wait_seconds:g} s (max wait); retry later",
            )
        exc = w.fut.exception()
        if exc is not None:
            raise exc
        cs = w.fut.result()
        self._last_activity_ns = time.monotonic_ns()
        if cs is not None:
            rec.cold_start = True
            rec.cold_start_wait_seconds = (time.monotonic_ns() - w.t_enq_ns) / 1e9
            rec.extra[COLD_START_ID_KEY] = cs.id
            cs.open_requests += 1
            self.m.held.inc()

    def notify_backend_failure(self) -> None:
        """The proxy could not reach the backend (connect refused, 503): hold what comes next."""
        if self._ready:
            log.info("cold start: backend failure reported; holding new requests until it is ready")
        self._ready = False

    def notify_activity(self) -> None:
        self._last_activity_ns = time.monotonic_ns()

    # ------------------------------------------------------------------ observer
    def on_request_start(self, rec: RequestRecord) -> None:
        self.in_flight += 1
        self._last_activity_ns = time.monotonic_ns()

    def on_tokens(self, rec: RequestRecord, n: int, t_ns: int) -> None:
        cs = self.current
        if cs is None or cs.finalized or cs.timeline.ready is None:
            return
        if rec.extra.get(COLD_START_ID_KEY) != cs.id or cs.timeline.first_token is not None:
            return
        cs.timeline.set("first_token", t_ns)
        self._spawn_bg(self._finalize(cs))

    def on_request_end(self, rec: RequestRecord) -> None:
        self.in_flight = max(0, self.in_flight - 1)
        self._last_activity_ns = time.monotonic_ns()
        cs = self.current
        if cs is not None and rec.extra.get(COLD_START_ID_KEY) == cs.id:
            cs.open_requests = max(0, cs.open_requests - 1)
            if cs.open_requests == 0 and not cs.finalized and cs.timeline.first_token is None \
                    and cs.timeline.ready is not None:
                self._spawn_bg(self._finalize(cs))      # none of its requests produced a token

    def on_request_final(self, rec: RequestRecord) -> None:
        if rec.outcome != "ok" or rec.cold_start:
            return
        if rec.energy is not None and rec.energy.source != "none" and rec.energy.full_joules > 0:
            self._req_joules.append(rec.energy.full_joules)
        d = rec.duration_seconds
        if d is not None and d > 0:
            self._req_seconds.append(d)
        now = time.monotonic_ns()
        if self.history and now - self._tax_refresh_ns > 500_000_000:
            self._tax_refresh_ns = now
            last = self.history[-1]
            if last.outcome == "ready" and last.finalized:
                self._update_tax(last)

    # ------------------------------------------------------------------ driver
    def _ensure_driver(self, reason: str = "request", hold_start_ns: int | None = None) -> None:
        if self._driver is None or self._driver.done():
            self._driver = asyncio.create_task(self._drive(reason, hold_start_ns), name="coldstart-driver")

    def _begin(self, reason: str, hold_start_ns: int | None) -> ColdStart:
        if self.current is not None and not self.current.finalized:
            # The previous cold start never saw its first token: close it before the next one.
            self._spawn_bg(self._finalize(self.current))
        t0 = hold_start_ns
        if t0 is None:
            t0 = self._waiters[0].t_enq_ns if self._waiters else time.monotonic_ns()
        cs = ColdStart(id=next(self._ids), reason=reason, timeline=ColdStartTimeline(hold_start=t0),
                       held_max=len(self._waiters))
        self.current = cs
        log.info("cold start %d begins (%s); %d request(s) held", cs.id, reason, len(self._waiters))
        return cs

    async def _drive(self, reason: str, hold_start_ns: int | None) -> None:
        cs: ColdStart | None = None
        try:
            sup = self.supervisor
            if sup is not None and (not sup.running or sup.stopping):
                # (a backend still draining after an idle stop: start() waits for the stop to end)
                cs = self._begin(reason, hold_start_ns)
                try:
                    t = await sup.start()
                except SpawnError as exc:
                    self.m.process_exits.labels(outcome="start_failed").inc()
                    self._fail(cs, "error", "spawn_failed", f"backend could not be started: {exc}")
                    return
                cs.timeline.set("process_start", t, "proxy")
                self.m.process_up.set(1)
            deadline = (cs.timeline.hold_start if cs else time.monotonic_ns()) + int(self.s.max_wait_seconds * 1e9)
            while True:
                pr = await self.probe.check()
                if cs is not None:
                    self._note_probe(cs, pr)
                if pr.ready and (sup is None or sup.running):   # not our child's answer if it exited
                    break
                if cs is None:
                    cs = self._begin(reason, hold_start_ns)
                    self._note_probe(cs, pr)
                    deadline = cs.timeline.hold_start + int(self.s.max_wait_seconds * 1e9)
                if sup is not None and not sup.running:
                    sup.record_failure()
                    self.m.process_exits.labels(outcome="start_failed").inc()
                    self._fail(cs, "error", "spawn_failed",
                               f"the backend process exited with code {sup.last_returncode} before it was ready")
                    return
                if time.monotonic_ns() >= deadline:
                    self._fail(cs, "timeout", "hold_timeout",
                               f"the backend did not become ready within {self.s.max_wait_seconds:g} s (max wait); retry later")
                    if sup is not None and sup.running:
                        await sup.stop(grace_seconds=min(self.s.stop_grace_seconds, 5.0))
                        self.m.process_exits.labels(outcome="start_failed").inc()
                        self.m.process_up.set(0)
                    return
                await asyncio.sleep(self.s.readiness_poll_seconds)
            if cs is not None:
                cs.timeline.set("ready", pr.t_ns, "proxy")
                self._cap_listening(cs)
                cs.outcome = "ready"
                self.m.cold_starts.labels(outcome="ready").inc()
                log.info("cold start %d: backend ready after %.2f s", cs.id, (pr.t_ns - cs.timeline.hold_start) / 1e9)
            if sup is not None:
                sup.record_success()
            await self._release_all(cs)
            self._ready = True
        except asyncio.CancelledError:
            if cs is not None and cs.outcome is None:
                cs.outcome = "error"
                cs.error = "cancelled (proxy shutting down)"
                self.m.cold_starts.labels(outcome="error").inc()
            raise
        except Exception as exc:   # never leave held requests hanging on a bug
            log.exception("cold start: driver failed")
            if cs is None:
                cs = self._begin(reason, hold_start_ns)
            self._fail(cs, "error", "spawn_failed", f"cold start failed: {exc}")

    def _note_probe(self, cs: ColdStart, pr: ProbeResult) -> None:
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

    @staticmethod
    def _cap_listening(cs: ColdStart) -> None:
        """The model server listens before it loads; polling sees it late. Cap at load_start."""
        tl = cs.timeline
        if tl.listening is not None and tl.load_start is not None and tl.listening > tl.load_start:
            tl.set("listening", tl.load_start, "backend(load_start)", overwrite=True)

    async def _release_all(self, cs: ColdStart | None) -> None:
        burst = max(1, self.s.release_burst)
        while self._waiters:
            n = 0
            while self._waiters and n < burst:
                w = self._waiters.popleft()
                self.held_bytes -= w.nbytes
                if not w.fut.done():
                    w.fut.set_result(cs)
                    n += 1
                    if cs is not None:
                        cs.released += 1
            self._set_pending()
            if self._waiters:
                await asyncio.sleep(self.s.release_interval_seconds)
        if cs is not None and cs.released == 0:
            # Nothing was waiting (a restart after a crash, or every client gave up): there is no
            # first request, so the cold start ends at ready.
            self._spawn_bg(self._finalize(cs))

    def _fail(self, cs: ColdStart, outcome: str, reason: str, message: str) -> None:
        cs.outcome = outcome
        cs.error = message
        self._ready = False
        self.m.cold_starts.labels(outcome=outcome).inc()
        log.warning("cold start %d failed (%s): %s", cs.id, outcome, message)
        self._reject_all(reason, message)
        self._spawn_bg(self._finalize(cs))

    def _reject_all(self, reason: str, message: str, retry_after_seconds: int | None = None) -> None:
        n = 0
        while self._waiters:
            w = self._waiters.popleft()
            self.held_bytes -= w.nbytes
            if not w.fut.done():
                w.fut.set_exception(GateRejected(reason, message, retry_after_seconds))
                n += 1
        if n:
            self.m.rejected.labels(reason=reason).inc(n)
        self._set_pending()

    def _remove(self, w: _Waiter) -> None:
        try:
            self._waiters.remove(w)
            self.held_bytes -= w.nbytes
        except ValueError:
            pass
        self._set_pending()

    def _set_pending(self) -> None:
        self.m.pending.set(len(self._waiters))
        self.m.held_bytes.set(self.held_bytes)

    def _spawn_bg(self, coro: Any) -> None:
        t = asyncio.get_running_loop().create_task(coro)
        self._bg.add(t)
        t.add_done_callback(self._bg.discard)

    # ------------------------------------------------------------------ supervisor events
    def _on_process_exit(self, returncode: int | None, expected: bool) -> None:
        self.m.process_up.set(0)
        if expected or self._closing:
            return
        self._ready = False
        if self._driver is not None and not self._driver.done():
            return    # the driver sees it and fails the cold start (start_failed)
        self.m.process_exits.labels(outcome="crash").inc()
        assert self.supervisor is not None
        self.supervisor.record_failure()
        idle = self.s.idle_timeout_seconds
        recently_used = idle is None or (time.monotonic_ns() - self._last_activity_ns) < idle * 1e9
        if self._waiters or self.in_flight > 0 or recently_used:
            log.warning("cold start: restarting the crashed backend (backoff %.1f s)",
                        self.supervisor.backoff_remaining_seconds())
            self._ensure_driver("restart", time.monotonic_ns())

    async def _idle_loop(self) -> None:
        assert self.supervisor is not None and self.s.idle_timeout_seconds
        idle_ns = int(self.s.idle_timeout_seconds * 1e9)
        period = max(0.05, min(1.0, self.s.idle_timeout_seconds / 4))
        sup = self.supervisor
        while True:
            await asyncio.sleep(period)
            if not sup.running or not self._ready or self._waiters or self.in_flight > 0:
                continue
            if self._driver is not None and not self._driver.done():
                continue
            if time.monotonic_ns() - self._last_activity_ns < idle_ns:
                continue
            log.info("cold start: no traffic for %g s; stopping the backend (scale to zero)",
                     self.s.idle_timeout_seconds)
            await self.scale_to_zero()

    # ------------------------------------------------------------------ finalisation
    async def _finalize(self, cs: ColdStart) -> None:
        if cs.finalized:
            return
        cs.finalized = True
        end = cs.end_ns
        if cs.outcome == "ready" and end is not None:
            for phase, secs in segment_seconds(cs.timeline).items():
                self.m.duration.labels(phase=phase).observe(secs)
            energy = self.energy
            if energy is not None:
                # The energy component closes a tick ~one period after it ends: give it that time.
                await asyncio.sleep(max(0.0, float(getattr(energy, "period_seconds", 0.1) or 0.1)) * 2)
                try:
                    cs.energy_joules = await joules_between(energy, cs.timeline.hold_start, end)
                except Exception:
                    log.exception("cold start: energy lookup failed")
                    cs.energy_joules = None
                if cs.energy_joules is not None:
                    cs.energy_source = source_name(energy)
                    self.m.energy.labels(phase="total", source=cs.energy_source).observe(cs.energy_joules)
            if cs.load_energy_joules is not None:
                self.m.energy.labels(phase="load", source="model_server").observe(cs.load_energy_joules)
            self._update_tax(cs)
        self.history.append(cs)
        self._emit_span(cs)

    def _update_tax(self, cs: ColdStart) -> None:
        """C_tax (energy and time ratios) and the keep-warm break-even idle time, from
        :mod:`edge_proxy.economics`; each stays None until its inputs exist."""
        e_cold, _src = cs.tax_joules
        cs.median_request_joules = _median(self._req_joules)
        cs.median_request_seconds = _median(self._req_seconds)
        cs.idle_watts = idle_watts(self.energy, self._idle_watts_configured)
        if e_cold is not None and cs.median_request_joules:
            cs.tax_energy_ratio = _finite(economics.cold_start_tax(e_cold, cs.median_request_joules))
        if cs.seconds is not None and cs.median_request_seconds:
            cs.tax_time_ratio = _finite(economics.cold_start_time_ratio(cs.seconds, cs.median_request_seconds))
        if e_cold is not None and cs.idle_watts:
            cs.break_even_idle_seconds = _finite(economics.keep_warm_break_even_seconds(e_cold, cs.idle_watts))
        if cs.tax_energy_ratio is not None:
            self.m.tax_energy.set(cs.tax_energy_ratio)
        if cs.tax_time_ratio is not None:
            self.m.tax_time.set(cs.tax_time_ratio)
        if cs.break_even_idle_seconds is not None:
            self.m.break_even.set(cs.break_even_idle_seconds)

    def _emit_span(self, cs: ColdStart) -> None:
        if self.tracer is None:
            return
        try:
            pair = ClockPair.now()
            end = cs.end_ns or time.monotonic_ns()
            attrs: dict[str, Any] = {
                "edge.cold_start.id": cs.id,
                "edge.cold_start.reason": cs.reason,
                "edge.cold_start.outcome": cs.outcome or "error",
                "edge.cold_start.held_max": cs.held_max,
                "edge.cold_start.released_requests": cs.released,
                "server.address": self.backend_url,
            }
            for phase, secs in segment_seconds(cs.timeline).items():
                attrs[f"edge.cold_start.phase.{phase}_seconds"] = secs
            for key, val in (("edge.energy.joules", cs.energy_joules),
                             ("edge.cold_start.load_energy_joules", cs.load_energy_joules),
                             ("edge.cold_start.tax_energy_ratio", cs.tax_energy_ratio),
                             ("edge.cold_start.tax_time_ratio", cs.tax_time_ratio),
                             ("edge.cold_start.keep_warm_break_even_idle_seconds", cs.break_even_idle_seconds)):
                if val is not None:
                    attrs[key] = val
            if cs.energy_joules is not None:
                attrs["edge.energy.source"] = cs.energy_source
            if cs.error:
                attrs["error.type"] = "cold_start_" + (cs.outcome or "error")
            span = self.tracer.start_span("cold_start", start_time=monotonic_to_epoch_ns(cs.timeline.hold_start, pair),
                                          attributes=attrs)
            for m in MILESTONES:
                t = getattr(cs.timeline, m)
                if t is not None:
                    span.add_event(f"cold_start.{m}", {"edge.source": cs.timeline.sources.get(m, "proxy")},
                                   timestamp=monotonic_to_epoch_ns(t, pair))
            if cs.error:
                from opentelemetry.trace import Status, StatusCode

                span.set_status(Status(StatusCode.ERROR, cs.error))
            span.end(end_time=monotonic_to_epoch_ns(end, pair))
        except Exception:
            log.exception("cold start: span export failed")

    async def scale_to_zero(self) -> bool:
        """Stop the supervised backend now if nothing is held or in flight (what the idle timer
        does after ``idle_timeout``). Returns True when a process was stopped."""
        sup = self.supervisor
        if sup is None or not sup.running or self._waiters or self.in_flight > 0:
            return False
        if self._driver is not None and not self._driver.done():
            return False
        self._ready = False
        await sup.stop()
        self.m.process_exits.labels(outcome="idle_stop").inc()
        self.m.process_up.set(0)
        return True

    def refresh_tax(self) -> dict[str, Any] | None:
        """Recompute the tax of the last finished cold start from the requests seen so far."""
        for cs in reversed(self.history):
            if cs.outcome == "ready":
                self._update_tax(cs)
                return cs.to_dict()
        return None

    def snapshot(self) -> dict[str, Any]:
        """JSON-able state: pending, ready, process, recent cold starts."""
        cur = self.current
        return {
            "ready": self._ready,
            "pending_requests": len(self._waiters),
            "held_request_bytes": self.held_bytes,
            "in_flight": self.in_flight,
            "process": None if self.supervisor is None else {
                "running": self.supervisor.running, "pid": self.supervisor.pid,
                "starts": self.supervisor.starts, "consecutive_failures": self.supervisor.failures,
                "last_returncode": self.supervisor.last_returncode,
            },
            "current": None if cur is None or cur.finalized else cur.to_dict(),
            "cold_starts": [c.to_dict() for c in self.history],
        }
