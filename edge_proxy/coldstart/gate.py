"""Hold mode: the :class:`~edge_proxy.proxy.hooks.BackendGate` that holds requests while the backend is
not ready and starts a cold start for them; the object the proxy sees, assembled from parts:

* admission and the hold queue (:mod:`.hold`): ``acquire`` returns at once while the backend is
  ready; otherwise the request joins a bounded FIFO (``max_pending`` requests, ``max_held_bytes``
  bytes) and waits at most ``max_wait`` seconds (then 503);
* the driver (:mod:`.driver`): one background task per cold start polls readiness, starts the
  backend (``--spawn``, :mod:`.supervisor`) and releases the held requests in bursts;
* recording (:mod:`.recording`): milestones, energy window, tax, span of each cold start;
* idle stop (:mod:`.idle`) and crash restart (``--spawn``);
* the drain on shutdown (SIGTERM): new requests get 503 + ``Retry-After`` at once; requests held
  for a cold start in progress wait up to ``drain_seconds`` for it to release them (they then finish
  normally; not with ``--spawn``, whose backend stops with the proxy), the rest are handed back with
  503 + ``Retry-After`` (reason ``draining``), so a client that retries reaches another replica;
* a :class:`~edge_proxy.proxy.hooks.RequestObserver`: counts requests in flight (idle stop never cuts a
  running request), sees the first token of the first released request (last phase), and hands
  warm requests to the recorder (tax inputs).

Owns: the ready flag, requests in flight, the last activity time, the driver task and the
lifecycle (start, drain, close). Must not: compute phases, energy or tax itself, or signal
processes (the supervisor does).
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from typing import Any
from urllib.parse import urlsplit

from edge_proxy.coldstart import idle
from edge_proxy.coldstart.driver import drive
from edge_proxy.coldstart.hold import DRAINING_MESSAGE, HoldQueue
from edge_proxy.coldstart.metrics import ColdStartMetrics
from edge_proxy.coldstart.probe import ReadinessProbe
from edge_proxy.coldstart.record import ColdStart
from edge_proxy.coldstart.recording import ColdStartRecorder
from edge_proxy.coldstart.supervisor import BackendSupervisor
from edge_proxy.config import ColdStartSettings
from edge_proxy.proxy.hooks import BaseObserver, RequestRecord

log = logging.getLogger("edge_proxy.coldstart")

COLD_START_ID_KEY = "cold_start_id"
TAX_REFRESH_NS = 500_000_000     # warm requests refresh the last cold start's tax at most this often


class ColdStartGate(BaseObserver):
    """BackendGate + observer. Create inside a running loop or call :meth:`start` from the app's
    ``on_startup``; call :meth:`shutdown` from ``on_shutdown`` and :meth:`close` from ``on_cleanup``."""

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
        self.s = settings
        self.m = metrics
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
        self.hold = HoldQueue(settings, metrics)
        self.recorder = ColdStartRecorder(metrics, tracer, backend_url, energy, idle_watts_configured, history_size)
        self.ready = False             # spawn: no process yet; hold: unknown until the first probe
        self.in_flight = 0
        self.last_activity_ns = time.monotonic_ns()
        self._driver: asyncio.Task[None] | None = None
        self._idle_task: asyncio.Task[None] | None = None
        self._bg: set[asyncio.Task[Any]] = set()
        self._tax_refresh_ns = 0
        self._closing = False

    # ------------------------------------------------------------------ views
    @property
    def history(self) -> deque[ColdStart]:
        """Finished cold starts, oldest first (economics reads them)."""
        return self.recorder.history

    @property
    def current(self) -> ColdStart | None:
        return self.recorder.current

    @property
    def pending(self) -> int:
        return len(self.hold)

    @property
    def held_bytes(self) -> int:
        return self.hold.held_bytes

    def held_records(self) -> list[RequestRecord]:
        """Requests held now (graceful stop leaves them to :meth:`shutdown`)."""
        return self.hold.records()

    @property
    def driving(self) -> bool:
        """A cold start is being driven now."""
        return self._driver is not None and not self._driver.done()

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        if self.supervisor is not None and self.s.idle_timeout_seconds:
            self._idle_task = asyncio.create_task(idle.idle_loop(self, self.s.idle_timeout_seconds),
                                                  name="coldstart-idle")
        if self.s.watch_startup and self.supervisor is None:
            # A proxy started before its backend (a sidecar in the server's pod): that start-up is
            # one cold start, recorded here once (reason "startup"; nothing if already ready).
            self.ensure_driver("startup", time.monotonic_ns())

    async def shutdown(self) -> None:
        """Drain (app ``on_shutdown``: the listener is already closed, before the server waits for
        open handlers). New requests are refused with 503 + Retry-After; requests held for a cold
        start in progress get up to ``drain_seconds`` to be released to the backend (they then
        finish normally); whatever is still held is handed back with 503 + Retry-After."""
        self._closing = True
        # With --spawn the backend stops with this proxy: nothing to wait for.
        deadline = time.monotonic() + (self.s.drain_seconds if self.supervisor is None else 0.0)
        while len(self.hold) and self.driving and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if len(self.hold):
            log.warning("shutting down: handing %d held requests back (503, Retry-After %d s)",
                        len(self.hold), self.s.retry_after_seconds)
        if self._driver is not None and not self._driver.done():
            self._driver.cancel()
            await asyncio.gather(self._driver, return_exceptions=True)
        self.hold.reject_all("draining", DRAINING_MESSAGE, self.s.retry_after_seconds)

    async def close(self) -> None:
        self._closing = True
        for t in (self._idle_task, self._driver):
            if t is not None and not t.done():
                t.cancel()
        for t in (self._idle_task, self._driver):
            if t is not None:
                await asyncio.gather(t, return_exceptions=True)
        self.hold.reject_all("draining", DRAINING_MESSAGE, self.s.retry_after_seconds)
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

    # ------------------------------------------------------------------ BackendGate
    async def acquire(self, rec: RequestRecord) -> None:
        now = time.monotonic_ns()
        self.last_activity_ns = now
        if self.ready and not len(self.hold):
            return
        w = self.hold.admit(rec, now, self._closing)
        cur = self.current
        if cur is not None and not cur.finalized:
            cur.held_max = max(cur.held_max, len(self.hold))
        self.ensure_driver()
        cs = await self.hold.wait(w)
        self.last_activity_ns = time.monotonic_ns()
        if cs is not None:
            rec.cold_start = True
            rec.cold_start_wait_seconds = (time.monotonic_ns() - w.t_enq_ns) / 1e9
            rec.extra[COLD_START_ID_KEY] = cs.id
            cs.open_requests += 1
            self.m.held.inc()

    def notify_backend_failure(self) -> None:
        """The proxy could not reach the backend (connect refused, 503): hold what comes next."""
        if self.ready:
            log.info("cold start: backend failure reported; holding new requests until it is ready")
        self.ready = False

    def notify_activity(self) -> None:
        self.last_activity_ns = time.monotonic_ns()

    # ------------------------------------------------------------------ observer
    def on_request_start(self, rec: RequestRecord) -> None:
        self.in_flight += 1
        self.last_activity_ns = time.monotonic_ns()

    def on_tokens(self, rec: RequestRecord, n: int, t_ns: int) -> None:
        cs = self.current
        if cs is None or cs.finalized or cs.timeline.ready is None:
            return
        if rec.extra.get(COLD_START_ID_KEY) != cs.id or cs.timeline.first_token is not None:
            return
        cs.timeline.set("first_token", t_ns)
        self.spawn_bg(self.recorder.finalize(cs))

    def on_request_end(self, rec: RequestRecord) -> None:
        self.in_flight = max(0, self.in_flight - 1)
        self.last_activity_ns = time.monotonic_ns()
        cs = self.current
        if cs is not None and rec.extra.get(COLD_START_ID_KEY) == cs.id:
            cs.open_requests = max(0, cs.open_requests - 1)
            if cs.open_requests == 0 and not cs.finalized and cs.timeline.first_token is None \
                    and cs.timeline.ready is not None:
                self.spawn_bg(self.recorder.finalize(cs))      # none of its requests produced a token

    def on_request_final(self, rec: RequestRecord) -> None:
        if not self.recorder.recent.add(rec):
            return
        now = time.monotonic_ns()
        if self.history and now - self._tax_refresh_ns > TAX_REFRESH_NS:
            self._tax_refresh_ns = now
            last = self.history[-1]
            if last.outcome == "ready" and last.finalized:
                self.recorder.update_tax(last)

    # ------------------------------------------------------------------ cold starts (driver's side)
    def ensure_driver(self, reason: str = "request", hold_start_ns: int | None = None) -> None:
        if not self.driving:
            self._driver = asyncio.create_task(drive(self, reason, hold_start_ns), name="coldstart-driver")

    def begin(self, reason: str, hold_start_ns: int | None) -> ColdStart:
        """Open the record of a new cold start (closing a previous one that never saw its first token)."""
        prev = self.current
        if prev is not None and not prev.finalized:
            self.spawn_bg(self.recorder.finalize(prev))
        t0 = hold_start_ns if hold_start_ns is not None else (self.hold.first_enqueued_ns or time.monotonic_ns())
        return self.recorder.begin(reason, t0, len(self.hold))

    def fail(self, cs: ColdStart, outcome: str, reason: str, message: str) -> None:
        """End ``cs`` as failed and answer everything held with 503 ``reason``."""
        self.recorder.mark_failed(cs, outcome, message)
        self.ready = False
        log.warning("cold start %d failed (%s): %s", cs.id, outcome, message)
        self.hold.reject_all(reason, message)
        self.spawn_bg(self.recorder.finalize(cs))

    def spawn_bg(self, coro: Any) -> None:
        t = asyncio.get_running_loop().create_task(coro)
        self._bg.add(t)
        t.add_done_callback(self._bg.discard)

    # ------------------------------------------------------------------ supervisor events
    def _on_process_exit(self, returncode: int | None, expected: bool) -> None:
        self.m.process_up.set(0)
        if expected or self._closing:
            return
        self.ready = False
        if self.driving:
            return    # the driver sees it and fails the cold start (start_failed)
        self.m.process_exits.labels(outcome="crash").inc()
        assert self.supervisor is not None
        self.supervisor.record_failure()
        idle_s = self.s.idle_timeout_seconds
        recently_used = idle_s is None or (time.monotonic_ns() - self.last_activity_ns) < idle_s * 1e9
        if len(self.hold) or self.in_flight > 0 or recently_used:
            log.warning("cold start: restarting the crashed backend (backoff %.1f s)",
                        self.supervisor.backoff_remaining_seconds())
            self.ensure_driver("restart", time.monotonic_ns())

    async def scale_to_zero(self) -> bool:
        """Stop the supervised backend now if nothing is held or in flight (what the idle timer
        does after ``idle_timeout``). Returns True when a process was stopped."""
        return await idle.scale_to_zero(self)

    def snapshot(self) -> dict[str, Any]:
        """``GET /edge/cold-starts`` (JSON): pending, ready, process, recent cold starts. The last
        finished cold start's tax is recomputed from the warm requests seen so far."""
        last = self.recorder.last_ready()
        if last is not None and last.finalized:
            self.recorder.update_tax(last)
        cur = self.current
        sup = self.supervisor
        return {
            "ready": self.ready,
            "pending_requests": len(self.hold),
            "held_request_bytes": self.hold.held_bytes,
            "in_flight": self.in_flight,
            "process": None if sup is None else {
                "running": sup.running, "pid": sup.pid, "starts": sup.starts,
                "consecutive_failures": sup.failures, "last_returncode": sup.last_returncode,
            },
            "current": None if cur is None or cur.finalized else cur.to_dict(),
            "cold_starts": [c.to_dict() for c in self.history],
        }
