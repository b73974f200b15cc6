"""The proxy-facing side of the ledger: a RequestObserver that feeds request events into the
ledger and, in ``finalize``, waits (bounded) for the request's energy to turn final and fills
``rec.energy``.

A request counts as in flight from the moment the proxy forwarded it to the backend
(``rec.t_forwarded_ns``), so a request held by the cold-start gate carries none of the energy of the
cold start it waited through (the cold-start report gives that energy).
"""
from __future__ import annotations

import asyncio
import time

from prometheus_client import Histogram

from edge_proxy.energy.apportion import prefill_share
from edge_proxy.energy.ledger import Ledger, RequestEnergy
from edge_proxy.proxy.hooks import BaseObserver, EnergyAttribution, RequestRecord
from edge_proxy.economics.metric_children import Children

REQUEST_ENERGY_BUCKETS_JOULES = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0,
                                 1000.0, 2500.0, 5000.0, 10000.0)


def to_attribution(res: RequestEnergy | None, source: str, final: bool | None = None) -> EnergyAttribution:
    if res is None:
        return EnergyAttribution(0.0, 0.0, source, "token-weighted", True)
    phase = (lambda x: None if x is None else max(0.0, x))    # noqa: E731
    return EnergyAttribution(active_joules=max(0.0, res.active_joules), full_joules=max(0.0, res.full_joules),
                             source=source, attribution=res.attribution,
                             provisional=not (res.final if final is None else final),
                             prefill_joules=phase(res.prefill_joules), decode_joules=phase(res.decode_joules))


class EnergyObserver(BaseObserver):
    def __init__(self, ledger: Ledger, source: str, period_seconds: float,
                 histogram: Histogram | None = None, finalize_wait_seconds: float | None = None,
                 response_header: bool = False, phase_histogram: Histogram | None = None) -> None:
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
        self._waiters: dict[str, asyncio.Future[None]] = {}          # finalize waits, by request id
        self._loop: asyncio.AbstractEventLoop | None = None
        ledger.final_listeners.append(self._on_final)

    def on_request_start(self, rec: RequestRecord) -> None:
        self.ledger.start(rec.request_id, rec.t_received_ns or time.monotonic_ns(), rec.model, rec.stream,
                          forwarded=lambda: rec.t_forwarded_ns, prompt_tokens=rec.input_tokens,
                          token_times=rec.token_times_ns)

    def on_tokens(self, rec: RequestRecord, n: int, t_ns: int) -> None:
        # the ledger reads rec.token_times_ns itself: it needs to hear only of the first token
        # (with the prompt count when the backend sent it in a header); the rest costs nothing here
        if t_ns == rec.t_first_token_ns and len(rec.token_times_ns) <= n:
            self.ledger.tokens(rec.request_id, n, t_ns, rec.input_tokens)

    def on_request_end(self, rec: RequestRecord) -> None:
        now = time.monotonic_ns()
        self.ledger.set_model(rec.request_id, rec.model)
        self.ledger.end(rec.request_id, rec.t_end_ns or now, prompt_tokens=rec.input_tokens,
                        output_tokens=rec.output_tokens, now_ns=now)

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
        """O(requests that turned final), not O(requests waiting)."""
        waiters = self._waiters
        for rid in rids:
            fut = waiters.pop(rid, None)
            if fut is not None and not fut.done():
                fut.set_result(None)

    async def finalize(self, rec: RequestRecord) -> None:
        """Wait (bounded) until the request's energy is final: woken once, by the ledger, when the
        tick that settles it has been split (not by polling); gives up when the source goes
        silent or after ``finalize_wait_seconds``, keeping the provisional estimate."""
        rid = rec.request_id
        if not self.ledger.is_final(rid) and self.source_alive():
            loop = asyncio.get_running_loop()
            self._loop = loop
            fut: asyncio.Future[None] = loop.create_future()
            self._waiters[rid] = fut
            deadline = time.monotonic() + self.finalize_wait_seconds
            try:
                while not self.ledger.is_final(rid):      # (re-checked: a tick may just have landed)
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    # check the source at least every alive window: a silent source ends the wait
                    done, _ = await asyncio.wait((fut,), timeout=min(left, self._alive_window_seconds))
                    if done or not self.source_alive():
                        break
            finally:
                self._waiters.pop(rid, None)
                if not fut.done():
                    fut.cancel()
        final = self.ledger.is_final(rec.request_id)
        res = self.ledger.release(rec.request_id) if final else self.ledger.estimate(rec.request_id, time.monotonic_ns())
        if not final:
            self.ledger.release(rec.request_id)     # the ledger forgets it once it turns final
        rec.energy = to_attribution(res, self.source, final)
        if self._histogram is not None and rec.traffic == "user":
            self._histogram(rec.model).observe(rec.energy.full_joules)
        if self._phase is not None and rec.traffic == "user" and rec.energy.prefill_joules is not None:
            self._phase(rec.model, "prefill").observe(rec.energy.prefill_joules)
            self._phase(rec.model, "decode").observe(rec.energy.decode_joules or 0.0)
