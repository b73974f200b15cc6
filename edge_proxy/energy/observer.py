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

from edge_proxy.energy.ledger import Ledger, RequestEnergy
from edge_proxy.hooks import BaseObserver, EnergyAttribution, RequestRecord
from edge_proxy.metric_children import Children

REQUEST_ENERGY_BUCKETS_JOULES = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0,
                                 1000.0, 2500.0, 5000.0, 10000.0)


def to_attribution(res: RequestEnergy | None, source: str, final: bool | None = None) -> EnergyAttribution:
    if res is None:
        return EnergyAttribution(0.0, 0.0, source, "token-weighted", True)
    return EnergyAttribution(active_joules=max(0.0, res.active_joules), full_joules=max(0.0, res.full_joules),
                             source=source, attribution=res.attribution,
                             provisional=not (res.final if final is None else final))


class EnergyObserver(BaseObserver):
    def __init__(self, ledger: Ledger, source: str, period_seconds: float,
                 histogram: Histogram | None = None, finalize_wait_seconds: float | None = None,
                 response_header: bool = False) -> None:
        self.ledger = ledger
        self.response_header = response_header
        self.wants_response_headers = response_header   # the proxy computes them only if so
        self.source = source
        self.period_seconds = period_seconds
        self.histogram = histogram
        self._histogram = Children(histogram) if histogram is not None else None
        # the tick after the end closes within about one period; allow for settling and lag,
        # but stay well inside the proxy's own 5 s finalize bound
        self.finalize_wait_seconds = (finalize_wait_seconds if finalize_wait_seconds is not None
                                      else min(4.0, max(1.0, 10 * period_seconds)))
        self._poll = max(0.005, min(0.05, period_seconds / 4))
        self._lag_seconds = min(0.01, period_seconds / 10)   # sampler read + ledger work after t1
        self._spread_seconds = min(0.025, period_seconds / 4)
        self._spread_i = 0

    def on_request_start(self, rec: RequestRecord) -> None:
        self.ledger.start(rec.request_id, rec.t_received_ns or time.monotonic_ns(), rec.model, rec.stream,
                          forwarded=lambda: rec.t_forwarded_ns)
        self.ledger.set_prompt_tokens(rec.request_id, rec.input_tokens)

    def on_tokens(self, rec: RequestRecord, n: int, t_ns: int) -> None:
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
        (always provisional: the ticks it overlaps have not all closed yet). Non-streaming only."""
        if not self.response_header:
            return {}
        est = self.ledger.estimate(rec.request_id, time.monotonic_ns())
        if est is None:
            return {}
        return {"x-edge-energy-joules": f"{max(0.0, est.full_joules):.3f}"}

    def source_alive(self) -> bool:
        """Ticks are arriving (the newest closed within max(1 s, 5 periods)); a dead or silent
        source (remote server without a GPU, stopped counter) makes finalize not wait at all."""
        newest = self.ledger.newest_tick_end_ns
        if newest is None:
            return False
        return time.monotonic_ns() - newest < max(1.0, 5 * self.period_seconds) * 1e9

    def _wait_seconds(self, rec: RequestRecord, deadline: float) -> float:
        """How long to sleep before checking finality again: until the tick that closes after the
        request's end is due (newest tick end + whole periods, plus a little lag), else one poll.
        One or two wake-ups per request instead of one every poll period."""
        wait = self._poll
        newest = self.ledger.newest_tick_end_ns
        end = rec.t_end_ns
        if newest is not None and end is not None and self.period_seconds > 0:
            period_ns = int(self.period_seconds * 1e9)
            due = newest + period_ns
            if due <= end:
                due += ((end - due) // period_ns + 1) * period_ns
            # spread the wake-ups of requests that end together (a batch) over a few ms, so their
            # end-of-request work (metrics, access log, economics) does not stall the loop at once
            self._spread_i = (self._spread_i + 1) % 16
            spread = self._spread_i * self._spread_seconds / 16
            target = (due - time.monotonic_ns()) / 1e9 + self._lag_seconds + spread
            if target > 0:           # else the tick is overdue (late read): poll
                wait = target
        return max(0.0, min(wait, deadline - time.monotonic()))

    async def finalize(self, rec: RequestRecord) -> None:
        deadline = time.monotonic() + self.finalize_wait_seconds
        while (not self.ledger.is_final(rec.request_id) and time.monotonic() < deadline
               and self.source_alive()):
            await asyncio.sleep(self._wait_seconds(rec, deadline))
        final = self.ledger.is_final(rec.request_id)
        res = self.ledger.release(rec.request_id) if final else self.ledger.estimate(rec.request_id, time.monotonic_ns())
        if not final:
            self.ledger.release(rec.request_id)     # the ledger forgets it once it turns final
        rec.energy = to_attribution(res, self.source, final)
        if self._histogram is not None and rec.traffic == "user":
            self._histogram(rec.model).observe(rec.energy.full_joules)
