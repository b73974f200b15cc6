"""The single-threaded core of the energy ledger: open requests, pending ticks, splitting, finality.

Only :class:`edge_proxy.energy.ledger.Ledger` touches it, under its lock (normally on the sampler
thread, which drains the request events the event loop queued). Rules (what is split when, idle
power, finality) are the ledger's; this module makes them cheap:

- a tick's candidate requests are listed once, when it is settled (a later tick arrived, or every
  request in it ended): O(requests open then);
- a tick that cannot be split yet remembers the requests whose weight it waits for (blockers) and
  is re-tried only when none of them blocks any more: each retry checks its blockers, not every
  request; the split itself is O(n log n) in the n requests of the tick, once;
- a request turns final when it has ended, a tick closed after its end, and no pending tick lists
  it (a reference count): checked for the few requests whose count just reached 0;
- estimates of a request's share of pending ticks are O(1) per tick (see :meth:`Core.estimate`).

Nothing here grows with the number of requests that already finished (``done`` is bounded).
"""
from __future__ import annotations

from collections import OrderedDict

from edge_proxy.energy.apportion import idle_share_joules
from edge_proxy.energy.ledger_deferral import blocks, recheck, register, unblock, wake
from edge_proxy.energy.ledger_estimate import estimate
from edge_proxy.energy.ledger_events import CoreEvents
from edge_proxy.energy.ledger_idle import IdlePower
from edge_proxy.energy.ledger_types import LedgerTotals, PendingTick, Req, RequestEnergy
from edge_proxy.energy.readings import Tick, merge_ticks
from edge_proxy.energy.tick_split import Shares, compute_split

__all__ = ["Core", "LedgerTotals", "PendingTick", "Req", "RequestEnergy"]

SCAN_UNENDED_MAX = 32      # settle the newest tick early (all its requests ended) only below this many open


class Core(CoreEvents):
    """Ticks, splitting and finality (request events: :class:`CoreEvents`)."""

    def __init__(self, idle_watts: float | None, prefill_weight: float, method: str, max_defer_ns: int,
                 max_pending: int, max_done: int, idle_window: int, idle_settle_ns: int,
                 prefill_window_ns: int, merge_ns: int = 500_000_000, merge_min_open: int = 128) -> None:
        self.method = method
        self.merge_ns = merge_ns
        self.merge_min_open = merge_min_open
        self.prefill_weight = prefill_weight
        self.max_defer_ns = max_defer_ns
        self.max_pending = max_pending
        self.max_done = max_done
        self.prefill_window_ns = prefill_window_ns
        self.active: dict[str, Req] = {}
        self.done: OrderedDict[str, Req] = OrderedDict()   # final, not released yet (bounded)
        self.pending: list[PendingTick] = []
        self.check: dict[str, Req] = {}                    # ended, refs 0: final once a tick closes after the end
        self.n_unended = 0
        self.newest_t1: int | None = None
        self.last_tick: Tick | None = None
        self.idle = IdlePower(idle_watts, idle_window, idle_settle_ns)
        self.totals = LedgerTotals()
        self.turned_final: list[str] = []
        self.dirty: list[Req] = []                         # blockers that changed since the last pass
        self.dropped: list[str] = []                       # released, never to be final (no ticks)
        self.totals.idle_watts, self.totals.idle_power_source = self.idle.watts, self.idle.source

    # -- ticks -------------------------------------------------------------------------------
    def add_tick(self, tick: Tick) -> None:
        t = self.totals
        t.measured_joules += tick.joules
        for u, j in tick.joules_by_gpu.items():
            t.measured_by_gpu[u] = t.measured_by_gpu.get(u, 0.0) + j
        t.pending_joules += tick.joules
        if tick.gap:
            t.ticks_gap += 1
        last = self.pending[-1] if self.pending else None
        if (last is not None and last.members is None and self.n_unended >= self.merge_min_open
                and tick.t0_ns == last.tick.t1_ns and tick.t1_ns - last.tick.t0_ns <= self.merge_ns):
            last.tick = merge_ticks(last.tick, tick)     # busy: split in units of up to merge_ns
        else:
            self.pending.append(PendingTick(tick))
        if self.newest_t1 is None or tick.t1_ns > self.newest_t1:
            self.newest_t1 = tick.t1_ns
            self.last_tick = tick

    def _list_members(self, p: PendingTick) -> None:
        t0, t1 = p.tick.t0_ns, p.tick.t1_ns
        members = []
        for r in self.active.values():
            v = r.view
            if v.start_ns < t1 and (v.end_ns is None or v.end_ns >= t0):
                members.append(r)
                r.refs += 1
        p.members = members

    def _settled(self, p: PendingTick) -> bool:
        if self.newest_t1 is not None and self.newest_t1 > p.tick.t1_ns:
            return True
        if self.n_unended >= SCAN_UNENDED_MAX:
            return False               # many open: it will settle when the next tick arrives
        t0, t1 = p.tick.t0_ns, p.tick.t1_ns
        return all(r.view.end_ns is not None for r in self.active.values()
                   if r.view.start_ns < t1 and (r.view.end_ns is None or r.view.end_ns >= t0) and r.in_flight())

    def _blocks(self, r: Req, p: PendingTick) -> bool:
        return blocks(r, p, self.method, self.prefill_weight, self.prefill_window_ns, self.newest_t1)

    def _recheck_dirty(self) -> None:
        dirty, self.dirty = self.dirty, []
        recheck(dirty, self._blocks)

    def _try_split(self, p: PendingTick, forced: bool) -> bool:
        if p.members is None:
            if not forced and not self._settled(p):
                return False
            self._list_members(p)
        elif p.blockers and not forced:
            if p.wake_at is not None and self.newest_t1 is not None and self.newest_t1 >= p.wake_at:
                wake(p, self._blocks)
            if p.blockers:
                return False
        res = compute_split(p, self.method, self.prefill_weight, self.prefill_window_ns, self.newest_t1,
                            self.idle.watts, forced)
        if isinstance(res, list):         # deferred: wait for these requests' weights
            register(p, res, self.prefill_window_ns)
            return False
        unblock(p)
        self._apply(p, res, forced)
        return True

    def _apply(self, p: PendingTick, res: Shares, forced: bool) -> None:
        tk = p.tick
        t = self.totals
        t.pending_joules -= tk.joules
        t.ticks_split += 1
        t.ticks_forced += int(forced)
        members = p.members or []
        if not res.reqs:
            held = any(r.view.end_ns is None and r.forwarded is not None and not r.in_flight() for r in members)
            if tk.at_rest is False and not held:
                # busy with work this proxy does not see: above idle power it is foreign
                idle = idle_share_joules(res.dE, self.idle.watts, tk.idle_seconds)
                t.foreign_joules += res.dE - idle
                t.ticks_foreign += 1
                t.idle_joules += idle
                t.idle_unattributed_joules += idle
            else:
                t.idle_joules += res.idle
                t.idle_unattributed_joules += res.idle_unattributed
            if not held:                 # a cold start (requests held) is not idle power
                self.idle.learn(tk, True)
        else:
            t.idle_joules += res.idle
            t.idle_unattributed_joules += res.idle_unattributed
            self.idle.busy_until(tk.t1_ns)
            self.idle.learn(tk, False)
            t0 = tk.t0_ns
            by_model = t.by_model
            sa = sf = 0.0
            for r, a, i in zip(res.reqs, res.active, res.idle_by):
                f = a + i
                r.active += a
                r.full += f
                ft = r.view.first_token_ns
                if ft is None or ft >= t0:
                    r.prefill += f
                sa += a
                sf += f
                acc = by_model.get(r.key)
                if acc is None:
                    acc = by_model[r.key] = [0.0, 0.0]
                acc[0] += a
                acc[1] += f
            t.active_joules += sa
            t.full_joules += sf
        check = self.check
        for r in members:
            r.refs -= 1
            if r.refs == 0 and r.view.end_ns is not None:
                check[r.view.rid] = r

    def process(self, now_ns: int, force_all: bool = False) -> None:
        """Split what can be split (forcing past the bounds, or everything), then finality."""
        pend = self.pending
        n_force = len(pend) if force_all else 0
        while n_force < len(pend) and (len(pend) - n_force > self.max_pending or
                                       now_ns - pend[n_force].tick.t1_ns > self.max_defer_ns):
            n_force += 1
        if self.dirty:
            self._recheck_dirty()
        keep: list[PendingTick] = []
        for i, p in enumerate(pend):
            if not self._try_split(p, forced=i < n_force):
                keep.append(p)
        self.pending = keep
        if not keep and abs(self.totals.pending_joules) < 1e-9:
            self.totals.pending_joules = 0.0
        self._finality()
        self.totals.idle_watts, self.totals.idle_power_source = self.idle.watts, self.idle.source

    def _finality(self) -> None:
        newest = self.newest_t1
        if newest is None or not self.check:
            return
        # the ticks not listed yet, as (t0, t1): an ended request overlaps one when start < t1 and end >= t0
        open_spans = [(p.tick.t0_ns, p.tick.t1_ns) for p in self.pending if p.members is None]
        check, active = self.check, self.active
        for rid, r in list(check.items()):
            if r.refs > 0 or rid not in active:
                del check[rid]                 # listed by a pending tick: back here when it is split
                continue
            v = r.view
            end = v.end_ns
            assert end is not None
            if newest <= end:
                continue
            start = v.start_ns
            for t0, t1 in open_spans:
                if start < t1 and end >= t0:
                    break                      # an unlisted tick overlaps it: not yet
            else:
                self._turn_final(rid, r)

    def _turn_final(self, rid: str, r: Req) -> None:
        """r's energy is final: out of ``active`` and ``check``, into ``done`` (bounded) unless released."""
        del self.check[rid]
        r.final = True
        del self.active[rid]
        self.turned_final.append(rid)
        if not r.released:
            self.done[rid] = r
            while len(self.done) > self.max_done:
                self.done.popitem(last=False)

    # -- estimates -----------------------------------------------------------------------------
    def estimate(self, r: Req, now_ns: int, pending: list[PendingTick] | None = None) -> RequestEnergy:
        """Provisional energy of r (see :func:`edge_proxy.energy.ledger_estimate.estimate`)."""
        return estimate(r, now_ns, self.pending if pending is None else pending, self.idle.watts,
                        self.newest_t1, self.last_tick, self.n_unended)
