"""Splitting one pending tick over its requests, in one pass that stays cheap at 1,000 requests.

The formulas are :mod:`edge_proxy.energy.apportion`'s (one definition; ``split_by_weights`` is the
reference, and a test checks this module gives the same joules). Most requests of a busy tick are
*steady*: in flight over the whole tick and past their first token, so their weight is just their
tokens in the tick (time-weighted: the tick's length), they can never defer the tick, and they all
own the same share of idle power. Those take a fast path (a binary search each); the others (starting,
ending, in prefill, non-streaming) go through ``apportion`` in full. Cost: O(n log n) for the n
requests of the tick.
"""
from __future__ import annotations

from dataclasses import dataclass

from edge_proxy.energy.apportion import (
    TOKEN_WEIGHTED, idle_share_joules, idle_time_shares_base, tick_weights, tokens_between)
from edge_proxy.energy.ledger_types import PendingTick, Req


@dataclass
class Shares:
    """One split: idle_k, and for each request (parallel lists) its active and idle joules."""

    dE: float
    idle: float
    reqs: list[Req]
    active: list[float]
    idle_by: list[float]

    @property
    def idle_unattributed(self) -> float:
        return self.idle - sum(self.idle_by)


def compute_split(p: PendingTick, method: str, prefill_weight: float, window_ns: int, horizon_ns: int | None,
                  idle_watts: float, forced: bool) -> Shares | list[Req]:
    """The tick's split, or (not forced) the requests whose weight it still waits for."""
    tk = p.tick
    t0, t1 = tk.t0_ns, tk.t1_ns
    token_w = method == TOKEN_WEIGHTED
    steady: list[Req] = []
    other: list[Req] = []
    for r in p.members or ():
        if r.forwarded is not None and not r.in_flight():
            continue                      # held by the cold-start gate: not in flight
        v = r.view
        s, e = v.start_ns, v.end_ns
        if s >= t1 or (e is not None and e < t0):
            continue
        ft = v.first_token_ns
        if s <= t0 and (e is None or e >= t1) and (not token_w or (
                v.token_times_known and ft is not None and ft < t0)):
            steady.append(r)
        else:
            other.append(r)
    views = [r.view for r in other]
    raw, blockers = tick_weights(views, t0, t1, method, prefill_weight, forced, window_ns, horizon_ns)
    if blockers:
        ids = set(blockers)
        return [r for r in other if r.view.rid in ids]
    dE = max(0.0, tk.joules)
    # a request that touches the tick only at an instant and has no weight in it was not really there
    other = [r for r in other if r.view.overlap_ns(t0, t1) > 0 or raw[r.view.rid] is None
             or raw[r.view.rid] > 0]  # type: ignore[operator]
    if not steady and not other:
        return Shares(dE, dE, [], [], [])
    dt = t1 - t0
    idle = idle_share_joules(dE, idle_watts, tk.idle_seconds)
    active = dE - idle
    if token_w:
        ws: list[float | None] = [float(tokens_between(r.view.ev_t, r.view.ev_n, t0, t1)) for r in steady]
    else:
        ws = [float(dt)] * len(steady)
    ws += [raw[r.view.rid] for r in other]
    reqs = steady + other
    known = [w for w in ws if w is not None]
    ksum = sum(known)
    mean = ksum / len(known) if known and ksum > 0 else 1.0
    weights = [mean if w is None else max(0.0, w) for w in ws]
    total = sum(weights)
    if total <= 0:
        weights = [float(r.view.overlap_ns(t0, t1)) for r in reqs]
        total = sum(weights)
    if total <= 0:
        weights = [1.0] * len(reqs)
        total = float(len(reqs))
    # w / total first (see apportion.split_weights: subnormal weights)
    act = [active * (w / total) for w in weights]
    shares, steady_share = idle_time_shares_base([r.view for r in other], t0, t1, len(steady))
    idle_steady = idle * steady_share
    idle_by = [idle_steady] * len(steady) + [idle * shares[r.view.rid] for r in other]
    return Shares(dE, idle, reqs, act, idle_by)
