"""Pure formulas of the energy ledger: how one tick's measured energy is split.

For a tick k covering [t0, t1) (dt = t1 - t0 seconds) with measured energy dE (J):

    idle_k   = min(dE, P_idle * dt)                     if any request overlaps the tick
             = dE                                       if none does (all idle)
    active_k = dE - idle_k
    active_i = active_k * w_i / sum_j w_j               (request i's share; w = weights below)
    idle_i   = idle_k / dt * integral over i's time in the tick of 1 / c(t) dt
                                                        (c(t) = requests in flight at t; so the
                                                        idle energy of every instant is shared
                                                        equally by the requests running then and
                                                        time nobody ran stays unattributed)
    full_i   = active_i + idle_i

Weights (``token-weighted``): output tokens the request produced in [t0, t1), plus
``prefill_weight * prompt_tokens`` spread over the prefill window before its first token,
[max(forwarded, t_first - W), t_first] with W = 80 ms by default (all of it in the tick holding
the first token when the window lies inside it). A request whose token times
are unknown (non-streaming: one response at the end) spreads its total weight
``output_tokens + prefill_weight * prompt_tokens`` uniformly over its lifetime, so it gets
``W * overlap / lifetime``. ``time-weighted``: w_i = overlap of the request with the tick. When
all weights are zero while requests are in flight (queueing, prefill before the first token),
the tick falls back to time overlap, then to an equal split, so nothing is ever left unassigned.

Invariant: sum_i active_i + idle_k = dE, and sum_i idle_i <= idle_k; all values >= 0.

Cost: a request's token weight in a tick is a binary search in its (time-ordered) token events,
so splitting a tick is O(n log n) in the n requests overlapping it, whatever ran before.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field

TOKEN_WEIGHTED = "token-weighted"
TIME_WEIGHTED = "time-weighted"
METHODS = (TOKEN_WEIGHTED, TIME_WEIGHTED)


@dataclass(slots=True)
class ReqView:
    """What the split needs to know about one request (times in monotonic ns). Slots: the split
    reads a few fields of every request of a tick, and the objects are cold in the cache by then."""

    rid: str
    start_ns: int
    end_ns: int | None
    token_times_known: bool
    first_token_ns: int | None = None
    ev_t: list[int] = field(default_factory=list)    # token event times (ns), in time order
    ev_n: list[int] | None = field(default_factory=list)   # tokens of each event; None: one each
    tokens_seen: int = 0                             # all tokens ever seen (events may be trimmed)

    @property
    def output_seen(self) -> int:
        return self.tokens_seen if self.ev_n is not None else len(self.ev_t)
    prompt_tokens: int | None = None
    output_tokens: int | None = None

    def overlaps(self, t0: int, t1: int) -> bool:
        return self.start_ns < t1 and (self.end_ns is None or self.end_ns >= t0)

    def overlap_ns(self, t0: int, t1: int) -> int:
        end = t1 if self.end_ns is None else min(self.end_ns, t1)
        return max(0, end - max(self.start_ns, t0))


def tokens_between(ev_t: list[int], ev_n: list[int] | None, t0: int, t1: int) -> int:
    """Output tokens of the (time-ordered) events in [t0, t1): two binary searches (``ev_n`` None:
    one token per event)."""
    if not ev_t or ev_t[-1] < t0 or ev_t[0] >= t1:
        return 0
    i = bisect.bisect_left(ev_t, t0)
    j = bisect.bisect_left(ev_t, t1, i)
    if ev_n is None:
        return j - i
    if j - i == 1:
        return ev_n[i]
    return sum(ev_n[i:j])


def prefill_share(prompt_tokens: int, output_tokens: int, prefill_weight: float) -> float:
    """Prefill's share of a request's energy when its token times are unknown (one response):
    pw * P / (pw * P + O), the request's own weights; 1 when both are 0."""
    wp = prefill_weight * prompt_tokens
    return wp / (wp + output_tokens) if wp + output_tokens > 0 else 1.0


class Deferred(Exception):
    """The tick cannot be split yet: a weight it needs is still unknown."""


def idle_share_joules(dE: float, idle_watts: float, dt_seconds: float) -> float:
    """idle_k = min(dE, P_idle * dt), never negative (J)."""
    return max(0.0, min(dE, idle_watts * dt_seconds))


def prefill_fraction(r: ReqView, t0: int, t1: int, window_ns: int, horizon_ns: int | None, forced: bool) -> float:
    """Share of request r's prefill weight that falls in tick [t0, t1).

    The prefill is taken to happen in the window [max(start, t_first - W), t_first] before the first
    token (W = ``window_ns``; the start is when the request was forwarded): the fraction is the
    window's overlap with the tick divided by its length (all of it in the tick holding t_first when
    the window is empty). Before the first token is known the window may still reach back into this
    tick while ``horizon - t1 < W`` (horizon: time up to which token events are complete): Deferred.
    """
    ft = r.first_token_ns
    if ft is not None and ft < t0:
        return 0.0                       # the window ends at the first token, before this tick
    if ft is None:
        if r.end_ns is not None or forced or (horizon_ns is not None and horizon_ns - t1 >= window_ns):
            return 0.0
        if r.start_ns >= t1:
            return 0.0
        raise Deferred(r.rid)
    a = max(r.start_ns, ft - window_ns)
    if ft <= a:
        return 1.0 if t0 <= ft < t1 else 0.0
    return max(0, min(ft, t1) - max(a, t0)) / (ft - a)


def request_weight(r: ReqView, t0: int, t1: int, method: str, prefill_weight: float, forced: bool,
                   prefill_window_ns: int = 80_000_000, horizon_ns: int | None = None) -> float | None:
    """Weight of request r in tick [t0, t1). Raises Deferred when unknown and not forced; None
    means "unknown, forced": the caller substitutes the mean weight of the others."""
    if method == TIME_WEIGHTED:
        return float(r.overlap_ns(t0, t1))
    if r.token_times_known:
        w = float(tokens_between(r.ev_t, r.ev_n, t0, t1))
        if prefill_weight <= 0:
            return w
        frac = prefill_fraction(r, t0, t1, prefill_window_ns, horizon_ns, forced)
        if frac > 0:
            if r.prompt_tokens is None:
                if r.end_ns is None and not forced:
                    raise Deferred(r.rid)
            else:
                w += prefill_weight * r.prompt_tokens * frac
        return w
    # token times unknown: spread the request's whole weight over its lifetime
    if r.end_ns is None:
        if not forced:
            raise Deferred(r.rid)
        return None
    out_tokens = r.output_tokens if r.output_tokens is not None else r.output_seen
    total = out_tokens + prefill_weight * (r.prompt_tokens or 0)
    life = r.end_ns - r.start_ns
    if life <= 0:
        return float(total) if t0 <= r.start_ns < t1 or (r.start_ns == t1 == r.end_ns) else 0.0
    return float(total) * r.overlap_ns(t0, t1) / life


def split_weights(active: float, weights: dict[str, float]) -> dict[str, float]:
    """active_i = active * w_i / sum w (J). Assumes sum w > 0."""
    total = sum(weights.values())
    # w / total first: with subnormal weights (a tiny prefill weight) active * w would lose its
    # precision before the division (1.5 * 5e-324 rounds to 1e-323: a share of 2.0 J out of 1.5)
    return {rid: active * (w / total) for rid, w in weights.items()}


def idle_time_shares(reqs: list[ReqView], t0: int, t1: int) -> dict[str, float]:
    """Fraction of the tick's duration owned by each request for idle power:
    (1/dt) * integral over [t0,t1) of [i in flight] / c(t) dt. Sums to the busy fraction (<= 1)."""
    return idle_time_shares_base(reqs, t0, t1, 0)[0]


def idle_time_shares_base(reqs: list[ReqView], t0: int, t1: int, base: int) -> tuple[dict[str, float], float]:
    """:func:`idle_time_shares` when ``base`` further requests are in flight over the whole tick:
    c(t) = base + (requests of ``reqs`` in flight at t). Returns the shares of ``reqs`` and the
    share of each of the ``base`` requests (the same for all of them). O(n log n) in len(reqs)."""
    dt = t1 - t0
    if dt <= 0:
        return {r.rid: 0.0 for r in reqs}, 0.0
    # a request in flight over the whole tick adds 1 to c(t) everywhere in the tick and owns what
    # one of the ``base`` ones owns: counted with them (the same integers, the same floats); only
    # the others are swept
    spans: list[tuple[int, int]] = []
    where: list[int] = []                 # per request of reqs: its index in spans, -1 if whole
    for r in reqs:
        a = max(r.start_ns, t0)
        e = r.end_ns
        b = t1 if e is None else min(e, t1)
        if a == t0 and b == t1:
            where.append(-1)
        else:
            where.append(len(spans))
            spans.append((a, b if b > a else a))
    n_whole = len(reqs) - len(spans)
    shares, whole, every = idle_sweep(spans, t0, t1, base + n_whole, n_whole)
    out = {r.rid: whole if k < 0 else shares[k] for r, k in zip(reqs, where)}
    return out, (every if base else 0.0)


def idle_sweep(spans: list[tuple[int, int]], t0: int, t1: int, base: int,
               n_whole: int = 0) -> tuple[list[float], float, float]:
    """The sweep behind :func:`idle_time_shares_base`: spans ``(a, b)`` (t0 <= a <= b) of requests in
    flight over part of a tick of dt = t1 - t0 > 0, while ``base`` requests run throughout (of them
    ``n_whole`` only up to t1: spans may reach past t1). Returns the share of each span, the share
    of a request in flight over [t0, t1) and the share of one of the ``base`` ones."""
    dt = t1 - t0
    bounds = sorted({t0, t1, *(a for a, _ in spans), *(b for _, b in spans)})
    starts = sorted(a for a, b in spans if b > a)
    ends = sorted(b for a, b in spans if b > a)
    # cumulative integral of 1/c(t) at each bound; c(lo) = base + starts <= lo - ends <= lo, counted
    # by a sweep (lo only grows)
    cum = [0.0]
    acc = 0.0
    i = j = 0
    n_s, n_e = len(starts), len(ends)
    for k in range(len(bounds) - 1):
        lo, hi = bounds[k], bounds[k + 1]
        while i < n_s and starts[i] <= lo:
            i += 1
        while j < n_e and ends[j] <= lo:
            j += 1
        c = base + i - j - (n_whole if lo >= t1 else 0)     # (the whole ones end at t1)
        acc = acc + ((hi - lo) / c if c > 0 else 0.0)
        cum.append(acc)
    at = {b: k for k, b in enumerate(bounds)}
    shares = [(cum[at[b]] - cum[at[a]]) / dt if b > a else 0.0 for a, b in spans]
    # (cum at t0 is 0.0: no bound lies before t0)
    return shares, cum[at[t1]] / dt, cum[-1] / dt


@dataclass
class TickSplit:
    """Result of splitting one tick: joules per request and the idle part."""

    dE: float
    idle: float                          # idle_k (J), includes what went into requests' full energy
    active: dict[str, float]             # rid -> active J
    idle_by_request: dict[str, float]    # rid -> idle J (part of full)
    forced: bool = False

    @property
    def idle_unattributed(self) -> float:
        return self.idle - sum(self.idle_by_request.values())


def tick_weights(reqs: list[ReqView], t0: int, t1: int, method: str, prefill_weight: float,
                 forced: bool, prefill_window_ns: int = 80_000_000, horizon_ns: int | None = None,
                 ) -> tuple[dict[str, float | None], list[str]]:
    """Weights of the requests overlapping [t0, t1) and the ids of those whose weight is not known
    yet (each would raise Deferred; never any when ``forced``). One pass, O(n log n)."""
    raw: dict[str, float | None] = {}
    blockers: list[str] = []
    for r in reqs:
        if not r.overlaps(t0, t1):
            continue
        try:
            raw[r.rid] = request_weight(r, t0, t1, method, prefill_weight, forced, prefill_window_ns, horizon_ns)
        except Deferred:
            blockers.append(r.rid)
    return raw, blockers


def split_by_weights(t0: int, t1: int, dE: float, reqs: list[ReqView], raw: dict[str, float | None],
                     idle_watts: float, forced: bool = False) -> TickSplit:
    """Split dE over the requests in ``raw`` (weights from :func:`tick_weights`; None = unknown,
    forced: the mean of the others) as the module docstring says."""
    dE = max(0.0, dE)
    # a request that touches the tick only at an instant and has no weight in it was not really there
    inflight = [r for r in reqs if r.rid in raw and
                (r.overlap_ns(t0, t1) > 0 or raw[r.rid] is None or raw[r.rid] > 0)]  # type: ignore[operator]
    if not inflight:
        return TickSplit(dE, dE, {}, {}, forced)
    dt_s = (t1 - t0) / 1e9
    idle = idle_share_joules(dE, idle_watts, dt_s)
    active = dE - idle
    vals = {r.rid: raw[r.rid] for r in inflight}
    known = [w for w in vals.values() if w is not None]
    mean = (sum(known) / len(known)) if known and sum(known) > 0 else 1.0
    weights = {rid: (mean if w is None else max(0.0, w)) for rid, w in vals.items()}
    if sum(weights.values()) <= 0:
        weights = {r.rid: float(r.overlap_ns(t0, t1)) for r in inflight}
    if sum(weights.values()) <= 0:
        weights = {r.rid: 1.0 for r in inflight}
    shares = split_weights(active, weights)
    time_share = idle_time_shares(inflight, t0, t1)
    idle_by = {rid: idle * f for rid, f in time_share.items()}
    return TickSplit(dE, idle, shares, idle_by, forced)


def split_tick(t0: int, t1: int, dE: float, reqs: list[ReqView], idle_watts: float,
               method: str = TOKEN_WEIGHTED, prefill_weight: float = 1.0, forced: bool = False,
               prefill_window_ns: int = 80_000_000, horizon_ns: int | None = None) -> TickSplit:
    """Split one tick's energy over the requests overlapping it (see the module docstring).
    Raises Deferred when a needed weight is not known yet and ``forced`` is False."""
    raw, blockers = tick_weights(reqs, t0, t1, method, prefill_weight, forced, prefill_window_ns, horizon_ns)
    if blockers:
        raise Deferred(blockers[0])
    return split_by_weights(t0, t1, dE, reqs, raw, idle_watts, forced)
