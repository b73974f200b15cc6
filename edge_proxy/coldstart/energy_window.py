"""Energy over a time window, from whatever energy component the proxy runs.

The energy component (``edge_proxy.energy``) keeps a ring of measured ticks. A cold start needs the
energy over its whole interval [hold_start, first_token], so this module asks the component for the
joules of the ticks that overlap the window, pro-rating the two edge ticks by overlap:

    E = sum_k  dE_k * |[t0_k, t1_k) ∩ [a, b)| / (t1_k - t0_k)

Duck-typed so the proxy runs with any energy component (or none): a component may offer
``joules_between(a_ns, b_ns)`` (sync or async) directly, or ``ticks_between(a_ns, b_ns)`` /
``ticks()`` returning objects with ``t0_ns``, ``t1_ns``, ``joules``.
"""
from __future__ import annotations

import inspect
from typing import Any, Iterable


def overlap_joules(ticks: Iterable[Any], a_ns: int, b_ns: int) -> tuple[float, float]:
    """Pro-rated energy of ``ticks`` inside [a_ns, b_ns) and the covered fraction of the window.

    Returns ``(joules, coverage)`` where coverage = covered ns / (b - a); a coverage well below 1
    means the source has gaps (or the ring no longer holds the start of the window).
    """
    if b_ns <= a_ns:
        return 0.0, 0.0
    joules = 0.0
    covered = 0
    for t in ticks:
        t0, t1 = int(t.t0_ns), int(t.t1_ns)
        if t1 <= t0:
            continue
        lo, hi = max(a_ns, t0), min(b_ns, t1)
        if hi <= lo:
            continue
        joules += float(t.joules) * (hi - lo) / (t1 - t0)
        covered += hi - lo
    return joules, covered / (b_ns - a_ns)


def source_name(energy: Any) -> str:
    return str(getattr(energy, "source", None) or getattr(energy, "source_name", None) or "none")


async def joules_between(energy: Any, a_ns: int, b_ns: int, min_coverage: float = 0.5) -> float | None:
    """Measured joules in [a_ns, b_ns), or None when no source covers (enough of) the window."""
    if energy is None or source_name(energy) == "none":
        return None
    fn = getattr(energy, "joules_between", None)
    if fn is not None:
        out = fn(a_ns, b_ns)
        if inspect.isawaitable(out):
            out = await out
        return None if out is None else float(out)
    ticks = None
    if hasattr(energy, "ticks_between"):
        ticks = energy.ticks_between(a_ns, b_ns)
    elif hasattr(energy, "ticks"):
        ticks = energy.ticks()
    if inspect.isawaitable(ticks):
        ticks = await ticks
    if ticks is None:
        return None
    j, cov = overlap_joules(ticks, a_ns, b_ns)
    return j if cov >= min_coverage else None


def idle_watts(energy: Any, configured: float | None) -> float | None:
    """Idle power: the configured value, else what the energy component learned, else None."""
    if configured is not None:
        return configured
    for name in ("idle_watts", "learned_idle_watts"):
        v = getattr(energy, name, None)
        if callable(v):
            v = v()
        if isinstance(v, (int, float)) and v > 0:
            return float(v)
    return None
