"""A request's provisional energy before its ticks are all split: what the finalize step reports
when it gives up waiting, and the opt-in ``x-edge-energy-joules`` header."""
from __future__ import annotations

from edge_proxy.energy.apportion import idle_share_joules
from edge_proxy.energy.ledger_types import PendingTick, Req, RequestEnergy
from edge_proxy.energy.readings import Tick


def estimate(r: Req, now_ns: int, pending: list[PendingTick], idle_watts: float, newest_t1: int | None,
             last_tick: Tick | None, n_unended: int) -> RequestEnergy:
    """Split so far + each pending tick's share for r (O(1) per tick: its time share among the
    requests the tick lists, or the open ones) + the time since the newest tick at that tick's
    power, shared with the open requests. Provisional: the final split weighs tokens."""
    if r.final:
        return r.energy(True)
    active, full, prefill = r.active, r.full, r.prefill
    v = r.view
    ft = v.first_token_ns
    for p in pending:
        tk = p.tick
        if not v.overlaps(tk.t0_ns, tk.t1_ns) or tk.t1_ns <= tk.t0_ns:
            continue
        idle = idle_share_joules(tk.joules, idle_watts, tk.idle_seconds)
        members = p.members
        n = len(members) if members else max(1, n_unended)
        frac_t = v.overlap_ns(tk.t0_ns, tk.t1_ns) / (tk.t1_ns - tk.t0_ns)
        a = (tk.joules - idle) * frac_t / n
        f = a + idle * frac_t / n
        active += a
        full += f
        if ft is None or ft >= tk.t0_ns:
            prefill += f
    newest, last = newest_t1, last_tick
    end = v.end_ns if v.end_ns is not None else now_ns
    if newest is not None and end > newest:
        power = (last.joules / last.dt_seconds) if last is not None and last.dt_seconds > 0 else 0.0
        n = max(1, n_unended + (1 if v.end_ns is not None else 0))
        span = (end - max(newest, v.start_ns)) / 1e9
        tail = power * span / n
        idle_part = min(tail, idle_watts * span * (last.share if last is not None else 1.0) / n)
        active += tail - idle_part
        full += tail
        if ft is None or ft >= newest:
            prefill += tail
    pre = r.prefill_part(full, prefill)
    return RequestEnergy(active, full, r.attribution, False, pre, None if pre is None else full - pre)
