"""The proxy-facing side of the ledger: a RequestObserver that feeds request events into the
ledger and, in ``finalize``, waits (bounded) for the request's energy to turn final and fills
``rec.energy`` and the per-request energy histograms.

Cost per request on the event loop (issue 17): a waiting finalize is one dict entry (the proxy's
bookkeeping calls :meth:`EnergyObserver.finalize_soon`, a callback: no task per request); the
ledger's notice that requests turned final (one per tick) settles all of them in one call and
observes the histograms per model in one step each (``BatchHistogram``); one timer for all
waiters (not one per request) enforces the wait bound and notices a silent source.

A request counts as in flight from the moment the proxy forwarded it to the backend
(``rec.t_forwarded_ns``), so a request held by the cold-start gate carries none of the energy of the
cold start it waited through (the cold-start report gives that energy).
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable

from edge_proxy.energy.apportion import prefill_share
from edge_proxy.energy.ledger import Ledger, RequestEnergy
from edge_proxy.proxy.hooks import BaseObserver, EnergyAttribution, RequestRecord
from edge_proxy.economics.metric_children import Children, observe_many

log = logging.getLogger("edge_proxy.energy")

# a finalize wait: the record, what to call once rec.energy is set, the deadline (time.monotonic())
Waiter = tuple[RequestRecord, Callable[[RequestRecord], None], float]

REQUEST_ENERGY_BUCKETS_JOULES = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0,
                                 1000.0, 2500.0, 5000.0, 10000.0)


def to_attribution(res: RequestEnergy | None, source: str, final: bool | None = None) -> EnergyAttribution:
    if res is None:
        return EnergyAttribution(0.0, 0.0, source, "token-weighted", True)
    pre, dec = res.prefill_joules, res.decode_joules
    return EnergyAttribution(max(0.0, res.active_joules), max(0.0, res.full_joules), source, res.attribution,
                             not (res.final if final is None else final),
                             None if pre is None else max(0.0, pre), None if dec is None else max(0.0, dec))


class EnergyObserver(BaseObserver):
    """``histogram``/``phase_histogram``: the per-request energy histograms (labels model, and
    model + phase); a ``BatchHistogram`` takes the requests settled together in one step, a
    ``prometheus_client.Histogram`` works too (one ``observe`` each)."""

    def __init__(self, ledger: Ledger, source: str, period_seconds: float,
                 histogram: Any = None, finalize_wait_seconds: float | None = None,
                 response_header: bool = False, phase_histogram: Any = None) -> None:
        self.ledger = ledger
        self.response_header = response_header
        self.wants_response_headers = response_header   # the proxy computes them only if so
        self.source = source
        self.period_seconds = period_seconds
        self.histogram = histogram
        self._histogram = Children(histogram) if histogram is not None else None
        self._phase = Children(phase_histogram) if phase_histogram is not None else None
        # the tick after the end closes within about one period, but a tick also waits for the
        # prompt count of every request whose first token it holds (OpenAI streams: usage comes
        # last), i.e. about one stream's length; stay inside the proxy's own 5 s finalize bound
        self.finalize_wait_seconds = finalize_wait_seconds if finalize_wait_seconds is not None else 4.0
        self._alive_window_seconds = max(1.0, 5 * period_seconds)     # see source_alive
        self._waiters: dict[str, Waiter] = {}          # finalize waits, by request id
        self._sweep_timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        ledger.final_listeners.append(self._on_final)

    def on_request_start(self, rec: RequestRecord) -> None:
        self.ledger.start(rec.request_id, rec.t_received_ns or time.monotonic_ns(), rec.model, rec.stream,
                          forwarded=lambda: rec.t_forwarded_ns, prompt_tokens=rec.input_tokens,
                          token_times=rec.token_times_ns)

    first_token_only = True       # the proxy's bookkeeping calls on_tokens for a stream's first event only

    def on_tokens(self, rec: RequestRecord, n: int, t_ns: int) -> None:
        # the ledger reads rec.token_times_ns itself: it needs to hear only of the first token
        # (with the prompt count when the backend sent it in a header); the rest costs nothing here
        if t_ns == rec.t_first_token_ns and len(rec.token_times_ns) <= n:
            self.ledger.tokens(rec.request_id, n, t_ns, rec.input_tokens)

    def on_request_end(self, rec: RequestRecord) -> None:
        self.ledger.end(rec.request_id, rec.t_end_ns or time.monotonic_ns(), prompt_tokens=rec.input_tokens,
                        output_tokens=rec.output_tokens, model=rec.model)

    def provisional(self, rec: RequestRecord) -> EnergyAttribution:
        """Energy as known now (pending ticks split as if now, plus the untracked tail)."""
        return to_attribution(self.ledger.estimate(rec.request_id, time.monotonic_ns()), self.source)

    def response_headers(self, rec: RequestRecord) -> dict[str, str]:
        """``x-edge-energy-joules``: the request's full joules as known when the response is sent
        (always provisional: the ticks it overlaps have not all closed yet). Non-streaming only.
        With the prefill/decode split when the request's token times are known
        (``x-edge-energy-prefill-joules``, ``x-edge-energy-decode-joules``)."""
        if not self.response_header:
            return {}
        est = self.ledger.estimate(rec.request_id, time.monotonic_ns())
        if est is None:
            return {}
        full = max(0.0, est.full_joules)
        out = {"x-edge-energy-joules": f"{full:.3f}"}
        prefill = est.prefill_joules
        if prefill is None and rec.input_tokens is not None and rec.output_tokens is not None:
            # one response, the ledger has not seen its end yet: by weight (docs/metrics.md)
            prefill = full * prefill_share(rec.input_tokens, rec.output_tokens, self.ledger.prefill_weight)
        if prefill is not None:
            prefill = min(full, max(0.0, prefill))
            out["x-edge-energy-prefill-joules"] = f"{prefill:.3f}"
            out["x-edge-energy-decode-joules"] = f"{full - prefill:.3f}"
        return out

    def source_alive(self) -> bool:
        """Ticks are arriving (the newest closed within max(1 s, 5 periods)); a dead or silent
        source (remote server without a GPU, stopped counter) makes finalize not wait at all."""
        newest = self.ledger.newest_tick_end_ns
        if newest is None:
            return False
        return time.monotonic_ns() - newest < self._alive_window_seconds * 1e9

    def _on_final(self, rids: list[str]) -> None:
        """Ledger listener (the sampler's thread, or the loop's): these requests turned final."""
        loop = self._loop
        if self._waiters and loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(self._wake_final, rids)
            except RuntimeError:      # the loop closed meanwhile
                pass

    def _wake_final(self, rids: list[str]) -> None:
        """O(requests that turned final), not O(requests waiting): settle those that wait."""
        waiters = self._waiters
        settled = []
        for rid in rids:
            w = waiters.pop(rid, None)
            if w is not None:
                settled.append(w)
        self._settle_waiters(settled)

    def _settle_waiters(self, settled: list[Waiter]) -> None:
        if not settled:
            return
        recs = [rec for rec, _, _ in settled]
        for rec in recs:
            self._settle(rec)
        self._observe(recs)
        for rec, done, _ in settled:
            try:
                done(rec)
            except Exception:  # noqa: BLE001 - one caller's callback must not stop the others
                log.exception("energy finalize callback failed")

    def _sweep(self) -> None:
        """The one timer of all waits: ends those past their deadline, or all of them when the
        source went silent; runs every alive window (or at the next deadline) while any wait."""
        self._sweep_timer = None
        waiters = self._waiters
        if not waiters:
            return
        now = time.monotonic()
        alive = self.source_alive()
        done = [rid for rid, (_, _, deadline) in waiters.items() if not alive or deadline <= now]
        self._settle_waiters([waiters.pop(rid) for rid in done])
        self._arm_sweep()

    def _arm_sweep(self) -> None:
        if self._sweep_timer is None and self._waiters and self._loop is not None:
            first = min(deadline for _, _, deadline in self._waiters.values())
            delay = max(0.0, min(self._alive_window_seconds, first - time.monotonic()))
            self._sweep_timer = self._loop.call_later(delay, self._sweep)

    def finalize_soon(self, rec: RequestRecord, done: Callable[[RequestRecord], None]) -> None:
        """:meth:`finalize` as a callback (what the proxy's bookkeeping calls: no task per
        request): ``done(rec)`` is called once, on the event loop, when ``rec.energy`` is set:
        at once when the request is final already or the source is silent, else when the tick
        that settles it has been split, the source goes silent, or after
        ``finalize_wait_seconds`` (the provisional estimate then)."""
        rid = rec.request_id
        if not self.ledger.is_final(rid) and self.source_alive():
            self._loop = asyncio.get_running_loop()
            self._waiters[rid] = (rec, done, time.monotonic() + self.finalize_wait_seconds)
            # (re-checked once registered: a tick may just have landed, telling no one)
            if not self.ledger.is_final(rid):
                if self._sweep_timer is None:
                    self._arm_sweep()
                return
            del self._waiters[rid]
        self._settle(rec)
        self._observe((rec,))
        done(rec)

    def forget(self, rec: RequestRecord) -> None:
        """Stop waiting for ``rec`` (its caller gave up): ``done`` will not be called."""
        self._waiters.pop(rec.request_id, None)

    async def finalize(self, rec: RequestRecord) -> None:
        """Wait (bounded) until the request's energy is final and set ``rec.energy``: woken once,
        by the ledger, when the tick that settles it has been split (not by polling); gives up
        when the source goes silent or after ``finalize_wait_seconds``, keeping the provisional
        estimate (:meth:`finalize_soon`, awaited)."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def done(_: RequestRecord) -> None:
            if not fut.done():
                fut.set_result(None)
        self.finalize_soon(rec, done)
        try:
            await fut
        finally:
            if not fut.done():       # cancelled: rec.energy stays unset, as it was
                self.forget(rec)

    def _settle(self, rec: RequestRecord) -> None:
        """``rec.energy``: final from the ledger, else the provisional estimate."""
        rid = rec.request_id
        final = self.ledger.is_final(rid)
        res = self.ledger.release(rid) if final else self.ledger.estimate(rid, time.monotonic_ns())
        if not final:
            self.ledger.release(rid)     # the ledger forgets it once it turns final
        rec.energy = to_attribution(res, self.source, final)

    def _observe(self, recs: "list[RequestRecord] | tuple[RequestRecord, ...]") -> None:
        """The histograms of settled user requests: one step per (model, phase) series."""
        if self._histogram is None and self._phase is None:
            return
        by_model: dict[str, list[RequestRecord]] = {}
        for rec in recs:
            if rec.traffic == "user" and rec.energy is not None:
                by_model.setdefault(rec.model, []).append(rec)
        for model, rs in by_model.items():
            if self._histogram is not None:
                observe_many(self._histogram(model), [r.energy.full_joules for r in rs])  # type: ignore[union-attr]
            if self._phase is not None:
                split = [r.energy for r in rs if r.energy.prefill_joules is not None]  # type: ignore[union-attr]
                if split:
                    observe_many(self._phase(model, "prefill"), [e.prefill_joules for e in split])
                    observe_many(self._phase(model, "decode"), [e.decode_joules or 0.0 for e in split])
