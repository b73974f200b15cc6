"""Splitting one pending tick over its requests, in one pass that stays cheap at 1,000 requests.

The formulas are :mod:`edge_proxy.energy.apportion`'s (one definition; ``split_by_weights`` is the
reference, and a test checks this module gives the same joules). Most requests of a busy tick are
*steady*: in flight over the whole tick and past their first token, so their weight is just their
tokens in the tick (time-weighted: the tick's length), they can never defer the tick, and they all
own the same share of idle power. Those take a fast path (a binary search each); the others (starting,
ending, in prefill, non-streaming) take ``apportion``'s weights, inlined for the token-weighted cases
(:func:`stream_weight`; a test checks it against ``request_weight``), with the idle sweep over the
ones not in flight over the whole tick. Cost: O(n log n) for the n requests of the tick.
"""
from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass

from edge_proxy.energy.apportion import (
    TOKEN_WEIGHTED, Deferred, ReqView, idle_share_joules, idle_sweep, request_weight, tokens_between)
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


def _tokens(v: ReqView, t0: int, t1: int) -> float:
    """float(tokens_between(...)) of a request in [t0, t1); the proxy's one-per-token list inline."""
    et = v.ev_t
    if v.ev_n is None:
        i = bisect_left(et, t0)
        return float(bisect_left(et, t1, i) - i)
    return float(tokens_between(et, v.ev_n, t0, t1))


def stream_weight(v: ReqView, t0: int, t1: int, prefill_weight: float, window_ns: int, horizon_ns: int | None,
                  forced: bool) -> float | None:
    """``apportion.request_weight`` of a stream (token times known, token-weighted) overlapping
    [t0, t1) that is not past its first token: its tokens in the tick plus ``prefill_weight x
    prompt x`` the share of its prefill window in the tick (``apportion.prefill_fraction``), in one
    call; None where those raise :class:`Deferred` (the tick must wait for it)."""
    w = _tokens(v, t0, t1)
    if prefill_weight <= 0:
        return w
    ft, e = v.first_token_ns, v.end_ns
    if ft is None:                        # (the window may still reach back into this tick)
        if e is not None or forced or (horizon_ns is not None and horizon_ns - t1 >= window_ns) or v.start_ns >= t1:
            return w
        return None
    if ft < t0:
        return w
    a = max(v.start_ns, ft - window_ns)
    if ft <= a:
        frac = 1.0 if t0 <= ft < t1 else 0.0
    else:
        frac = max(0, min(ft, t1) - max(a, t0)) / (ft - a)
    if frac > 0:
        if v.prompt_tokens is None:
            if e is None and not forced:
                return None
        else:
            w += prefill_weight * v.prompt_tokens * frac
    return w


def blockers_of(members: "list[Req] | tuple[()]", t0: int, t1: int, method: str, prefill_weight: float,
                window_ns: int, horizon_ns: int | None) -> list[Req]:
    """The requests (in order) whose weight in tick [t0, t1) is not known yet, i.e. the list
    :func:`compute_split` returns when the tick waits (token-weighted, not forced), without the
    weights of the others: a request that ended, or a stream past its first token, never waits
    (``request_weight`` defers only while the end is unknown, and there is no prefill after the
    first token); a response whose token times are unknown waits for its end."""
    out: list[Req] = []
    for r in members:
        if r.forwarded is not None and not r.in_flight():
            continue                      # held by the cold-start gate: not in flight
        v = r.view
        if v.end_ns is not None or v.start_ns >= t1:
            continue
        if not v.token_times_known:
            out.append(r)
            continue
        ft = v.first_token_ns
        if ft is not None and ft < t0:
            continue
        if stream_weight(v, t0, t1, prefill_weight, window_ns, horizon_ns, False) is None:
            out.append(r)
    return out


def compute_split(p: PendingTick, method: str, prefill_weight: float, window_ns: int, horizon_ns: int | None,
                  idle_watts: float, forced: bool) -> Shares | list[Req]:
    """The tick's split, or (not forced) the requests whose weight it still waits for.

    One pass over the members, each read once: steady ones get their token count; the others their
    weight (``apportion.request_weight``, inlined for a response whose token times are unknown:
    the common non-streaming case, without raising :class:`Deferred` per request) and, when they
    are not in flight over the whole tick, their span for the idle sweep; once one blocks, the rest
    are only checked for blocking. The steady ones' token counts are taken once the tick is known
    not to wait (a tick that waits costs no binary search). When the newest member may wait, the
    waiters are looked for first (:func:`blockers_of`): a tick that waits then costs no weight."""
    tk = p.tick
    t0, t1 = tk.t0_ns, tk.t1_ns
    token_w = method == TOKEN_WEIGHTED
    members = p.members or ()
    if token_w and not forced and members:
        v = members[-1].view              # the newest request: when it may wait, look for waiters first
        if v.end_ns is None and not (v.token_times_known and v.first_token_ns is not None and v.first_token_ns < t0):
            waiting = blockers_of(members, t0, t1, method, prefill_weight, window_ns, horizon_ns)
            if waiting:
                return waiting
    fdt = float(t1 - t0)
    steady: list[Req] = []
    other: list[Req] = []
    ows: list[float | None] = []          # other's weights, in order
    spans: list[tuple[int, int]] = []     # idle spans of the others not in flight over the whole tick
    where: list[int] = []                 # per other: its index in spans, -1 if in flight throughout
    blockers: list[Req] = []
    for r in members:
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
            w = _tokens(v, t0, t1)
        elif token_w:                     # a stream at or before its first token: tokens + prefill share
            w = stream_weight(v, t0, t1, prefill_weight, window_ns, horizon_ns, forced)
            if w is None:
                blockers.append(r)
                continue
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
    if token_w:
        ws: list[float | None] = [_tokens(r.view, t0, t1) for r in steady]
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
