"""One cold start's own tax, reported in its record (``GET /edge/cold-starts``, the span, the
cold-start benchmark): recent warm requests as energy windows, and the energy and time ratios and
the keep-warm break-even idle time of a :class:`ColdStart`, from the formulas module (this module
only chooses the inputs). The exported C_tax gauges are economics' (its window, one definition).

    C_tax (energy)  = E_cold / mean E_req         E_req: full-attribution joules of a warm request
    C_tax (time)    = t_cold / mean t_req         t_req: its proxy end-to-end seconds
    break-even idle = E_cold / P_idle             P_idle: configured, else learned by the ledger

A warm request is an ``ok`` request that was not held for a cold start; it is kept as the
:class:`~edge_proxy.energy.window.Measurement` of its interval ``[t_received, t_end)`` with the
joules the ledger attributed to it (the ledger's attribution is not redone here).

Owns: the last ``size`` warm requests and the tax fields of a record. Must not: export metrics
(the recorder sets the gauges), measure energy, or hold requests.
"""
from __future__ import annotations

import math
from collections import deque
from typing import Any

from edge_proxy.economics import formulas as economics
from edge_proxy.coldstart.record import ColdStart
from edge_proxy.energy.window import Measurement, source_kind
from edge_proxy.proxy.hooks import RequestRecord


def _finite(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else x


def idle_watts(energy: Any, configured: float | None) -> float | None:
    """Idle power: the configured value, else what the energy component learned, else None."""
    if configured is not None:
        return configured
    v = getattr(energy, "idle_watts", None)
    v = v() if callable(v) else v
    return float(v) if isinstance(v, (int, float)) and v > 0 else None


class RecentRequests:
    """The last ``size`` warm requests, each the window of its interval and attributed joules."""

    def __init__(self, size: int = 512) -> None:
        self.windows: deque[Measurement] = deque(maxlen=size)

    def add(self, rec: RequestRecord) -> bool:
        """Keep ``rec`` when it is a warm ``ok`` request that ended; True when kept."""
        if rec.outcome != "ok" or rec.cold_start or rec.t_end_ns is None:
            return False
        e = rec.energy
        measured = e is not None and e.source != "none" and e.full_joules > 0
        source = e.source if measured and e is not None else "none"
        self.windows.append(Measurement(
            rec.request_id, rec.t_received_ns, rec.t_end_ns, e.full_joules if measured and e is not None else 0.0,
            source=source, kind=source_kind(source)))
        return True

    def joules(self) -> list[float]:
        """Attributed joules of the kept requests that have a measured (or estimated) energy."""
        return [m.joules for m in self.windows if m.source != "none"]

    def seconds(self) -> list[float]:
        return [m.seconds for m in self.windows if m.seconds > 0]


def update_tax(cs: ColdStart, recent: RecentRequests, idle_w: float | None) -> None:
    """Fill ``cs``'s tax fields; each stays None until its inputs exist."""
    e_cold, _src = cs.tax_joules
    joules, seconds = recent.joules(), recent.seconds()
    cs.mean_request_joules = sum(joules) / len(joules) if joules else None
    cs.mean_request_seconds = sum(seconds) / len(seconds) if seconds else None
    cs.idle_watts = idle_w
    if e_cold is not None and cs.mean_request_joules:
        cs.tax_energy_ratio = _finite(economics.cold_start_tax_from_totals(e_cold, 1, sum(joules), len(joules)))
    if cs.seconds is not None and cs.mean_request_seconds:
        cs.tax_time_ratio = _finite(economics.cold_start_time_ratio_from_totals(
            cs.seconds, 1, sum(seconds), len(seconds)))
    if e_cold is not None and cs.idle_watts:
        cs.break_even_idle_seconds = _finite(economics.keep_warm_break_even_seconds(e_cold, cs.idle_watts))
