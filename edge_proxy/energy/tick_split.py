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

from bisect import bisect_left
from dataclasses import dataclass

from edge_proxy.energy.apportion import (
    TOKEN_WEIGHTED, Deferred, idle_share_joules, idle_sweep, request_weight, tokens_between)
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
    """The tick's split, or (not forced) the requests whose weight it still waits for.

    One pass over the members, each read once: steady ones get their token count; the others their
    weight (``apportion.request_weight``, inlined for a response whose token times are unknown:
    the common non-streaming case, without raising :class:`Deferred` per request) and, when they
    are not in flight over the whole tick, their span for the idle sweep; once one blocks, the rest
    are only checked for blocking. The steady ones' token counts are taken once the tick is known
    not to wait (a tick that waits costs no binary search)."""
    tk = p.tick
    t0, t1 = tk.t0_ns, tk.t1_ns
    token_w = method == TOKEN_WEIGHTED
    fdt = float(t1 - t0)
    steady: list[Req] = []
    other: list[Req] = []
    ows: list[float | None] = []          # other's weights, in order
    spans: list[tuple[int, int]] = []     # idle spans of the others not in flight over the whole tick
    where: list[int] = []                 # per other: its index in spans, -1 if in flight throughout
    blockers: list[Req] = []
    for r in p.members or ():
        if r.forwarded is not None and not r.in_flight():
            continue                      # held by the cold-start gate: not in flight
        v = r.view
        s, e = v.start_ns, v.end_ns
        if s >= t1 or (e is not None and e < t0):
            continue
        known = v.token_times_known
        ft = v.first_token_ns
        past_first = known and ft is not None and ft < t0     # a stream past its first token
        if s <= t0 and (e is None or e >= t1) and (not token_w or past_first):
            steady.append(r)              # (its weight once the tick is known not to wait)
            continue
        w: float | None
        b = t1 if e is None or e > t1 else e          # its part of the tick: [a, b)
        a = s if s > t0 else t0
        if token_w and not known:         # one response: its whole weight spread over its lifetime
            if e is None:
                if not forced:
                    blockers.append(r)
                    continue
                w = None
            elif blockers:
                continue                  # the tick waits anyway: only blockers matter now
            else:
                out = v.output_tokens if v.output_tokens is not None else v.output_seen
                total = out + prefill_weight * (v.prompt_tokens or 0)
                life = e - s
                if life <= 0:
                    w = float(total) if t0 <= s < t1 or (s == t1 == e) else 0.0
                else:             # (request_weight: total x overlap / lifetime)
                    w = float(total) * (b - a if b > a else 0) / life
        elif token_w and past_first:      # (request_weight: its tokens; no prefill after the first token)
            if blockers:
                continue                  # it never waits: only blockers matter now
            w = float(tokens_between(v.ev_t, v.ev_n, t0, t1))
        else:
            try:
                w = request_weight(v, t0, t1, method, prefill_weight, forced, window_ns, horizon_ns)
            except Deferred:
                blockers.append(r)
                continue
        if blockers:
            continue
        # a request that touches the tick only at an instant and has no weight in it was not really there
        if (w is None or w > 0) or b - a > 0:
            other.append(r)
            ows.append(w)
            if a == t0 and b == t1:
                where.append(-1)
            else:
                where.append(len(spans))
                spans.append((a, b if b > a else a))
    if blockers:                          # deferred: wait for these requests' weights
        return blockers
    dE = max(0.0, tk.joules)
    if not steady and not other:
        return Shares(dE, dE, [], [], [])
    idle = idle_share_joules(dE, idle_watts, tk.idle_seconds)
    active = dE - idle
    if token_w:                           # (tokens_between, inlined for the proxy's one-per-token lists)
        ws: list[float | None] = []
        for r in steady:
            v = r.view
            et = v.ev_t
            if v.ev_n is None:
                i = bisect_left(et, t0)
                ws.append(float(bisect_left(et, t1, i) - i))
            else:
                ws.append(float(tokens_between(et, v.ev_n, t0, t1)))
    else:
        ws = [fdt] * len(steady)
    ws += ows
    reqs = steady + other
    total = sum(ws) if None not in ws else -1.0       # type: ignore[arg-type]
    if total == total and total > 0 and min(ws) > 0.0:   # type: ignore[type-var]
        weights: list[float] = ws                  # type: ignore[assignment]
    else:                                          # unknown weights (the mean of the others), zeros
        known_ws = [w for w in ws if w is not None]
        ksum = sum(known_ws)
        mean = ksum / len(known_ws) if known_ws and ksum > 0 else 1.0
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
    # idle: every request in flight over the whole tick (steady or not) owns the same share
    # (apportion.idle_time_shares_base; all bounds lie in [t0, t1] here)
    idle_whole = 0.0
    if t1 > t0 and idle != 0.0:           # (idle 0 J: every share is 0.0 J, no sweep needed)
        shares, whole_share, _ = idle_sweep(spans, t0, t1, len(steady) + len(other) - len(spans))
        idle_whole = idle * whole_share
        idle_by = [idle_whole] * len(steady)
        idle_by += [idle_whole if k < 0 else idle * shares[k] for k in where] if spans else [idle_whole] * len(other)
    else:
        idle_by = [idle * 0.0] * len(reqs)
    return Shares(dE, idle, reqs, act, idle_by)
