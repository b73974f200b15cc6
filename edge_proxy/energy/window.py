"""Energy measurement windows: ``begin_window(name)`` / ``end_window(name) -> Measurement`` over
the sampler's ticks (the shape of ml-energy/zeus ``zeus/monitor/energy.py``: a window is a
first-class object, not a pair of numbers each caller subtracts itself).

Owns: the duration and the energy (per device) of one interval ``[a, b)`` on the proxy's monotonic
clock (``time.monotonic_ns()``, the clock of every :class:`~edge_proxy.energy.readings.Tick`), the
source kind of that energy, and whether it is whole. The two edge ticks are pro-rated by overlap::

    E_d     = sum_k  dE_{k,d} * |[t0_k, t1_k) ∩ [a, b)| / (t1_k - t0_k)     joules, device d
    E       = sum_k  dE_k     * |[t0_k, t1_k) ∩ [a, b)| / (t1_k - t0_k)     joules, all devices
    seconds = (b - a) / 1e9
    coverage = |union of [t0_k, t1_k) ∩ [a, b)| / (b - a)                   (0..1)

``gap`` is True when a tick inside the window spans a failed read, a counter reset or a device that
did not answer (the sampler's ``Tick.gap``): the energy is then a lower bound. ``coverage`` below 1
means the sampler holds no tick for part of the window (its ring no longer reaches the start, or
no tick has closed past the end yet: ask again a sampling period or two after ``b``).

Must not: split energy over requests (the ledger does), export metrics (the exporter does), read an
energy source itself (only the sampler thread reads sources), or block the event loop.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Literal, Protocol

from edge_proxy.energy.readings import Tick

SourceKind = Literal["measured", "replayed", "estimated", "none"]

# What each source's joules are. Anything not listed is never presented as a measurement.
SOURCE_KINDS: dict[str, SourceKind] = {
    "nvml": "measured", "remote": "measured", "replay": "replayed", "estimated": "estimated",
}


def source_kind(source: str) -> SourceKind:
    """``measured`` (nvml, remote), ``replayed`` (a recorded trace), ``none`` (no source: no
    energy) or ``estimated`` (the estimated source and anything not listed)."""
    return "none" if source == "none" else SOURCE_KINDS.get(source, "estimated")


@dataclass(frozen=True)
class Measurement:
    """One closed window: ``[start_ns, end_ns)`` on the monotonic clock and its energy."""

    name: str
    start_ns: int
    end_ns: int
    joules: float                                   # all devices
    joules_by_device: dict[str, float] = field(default_factory=dict)
    source: str = "none"                            # the reader's name: nvml | remote | replay | estimated
    kind: SourceKind = "estimated"
    gap: bool = False                               # a tick in the window was a counter gap
    coverage: float = 0.0                           # fraction of the window covered by ticks

    @property
    def seconds(self) -> float:
        """Window length: ``(end_ns - start_ns) / 1e9`` seconds (0 for an empty window)."""
        return max(0, self.end_ns - self.start_ns) / 1e9

    @property
    def complete(self) -> bool:
        """Every nanosecond of the window is covered by ticks and none of them was a gap."""
        return not self.gap and self.coverage >= 1.0 - 1e-9

    def joules_if_covered(self, min_coverage: float = 0.5) -> float | None:
        """``joules``, or None when ticks cover less than ``min_coverage`` of the window."""
        return self.joules if self.coverage >= min_coverage else None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "seconds": self.seconds, "joules": self.joules,
                "joules_by_device": dict(self.joules_by_device), "source": self.source,
                "kind": self.kind, "gap": self.gap, "coverage": self.coverage}


def measure_ticks(ticks: Iterable[Tick], a_ns: int, b_ns: int, *, source: str, name: str = "") -> Measurement:
    """The window ``[a_ns, b_ns)`` over ``ticks`` (formulas in the module docstring). Pure."""
    a_ns, b_ns = int(a_ns), int(b_ns)
    joules = 0.0
    by_dev: dict[str, float] = {}
    spans: list[tuple[int, int]] = []
    gap = False
    for t in ticks:
        t0, t1 = int(t.t0_ns), int(t.t1_ns)
        lo, hi = max(a_ns, t0), min(b_ns, t1)
        if t1 <= t0 or hi <= lo:
            continue
        frac = (hi - lo) / (t1 - t0)
        joules += float(t.joules) * frac
        for dev, j in t.joules_by_gpu.items():
            by_dev[dev] = by_dev.get(dev, 0.0) + float(j) * frac
        spans.append((lo, hi))
        gap = gap or bool(t.gap)
    covered, reach = 0, a_ns
    for lo, hi in sorted(spans):            # union, so overlapping ticks are not counted twice
        lo = max(lo, reach)
        if hi > lo:
            covered += hi - lo
            reach = hi
    coverage = covered / (b_ns - a_ns) if b_ns > a_ns else 0.0
    return Measurement(name, a_ns, b_ns, joules, by_dev, source, source_kind(source), gap, coverage)


class TickSource(Protocol):
    """What windows read: the sampler (or the energy component, which forwards to it)."""

    source: str

    def ticks_between(self, a_ns: int, b_ns: int) -> list[Tick]: ...


class EnergyWindows:
    """Named windows over one tick source. ``begin_window`` / ``end_window`` as in zeus; a window
    whose two ends are already known (a cold start's hold start and first token) is
    :meth:`measure`. Event-loop (or single-thread) use; the sampler's own lock guards the ticks."""

    def __init__(self, ticks: TickSource, clock: Callable[[], int] = time.monotonic_ns) -> None:
        self.ticks = ticks
        self.clock = clock
        self._open: dict[str, int] = {}

    @property
    def source(self) -> str:
        return str(self.ticks.source)

    @property
    def open_windows(self) -> tuple[str, ...]:
        return tuple(self._open)

    def begin_window(self, name: str, t_ns: int | None = None) -> int:
        """Open window ``name`` at ``t_ns`` (default: now); returns its start. ValueError if open."""
        if name in self._open:
            raise ValueError(f"energy window {name!r} is already open")
        start = self.clock() if t_ns is None else int(t_ns)
        self._open[name] = start
        return start

    def end_window(self, name: str, t_ns: int | None = None, *, cancel: bool = False) -> Measurement | None:
        """Close window ``name`` at ``t_ns`` (default: now) and measure it (None with ``cancel``).
        ValueError when no such window is open. The energy is what the sampler has closed ticks
        for by now; see ``coverage``."""
        try:
            start = self._open.pop(name)
        except KeyError:
            raise ValueError(f"energy window {name!r} is not open") from None
        if cancel:
            return None
        return self.measure(start, self.clock() if t_ns is None else int(t_ns), name=name)

    def measure(self, a_ns: int, b_ns: int, name: str = "") -> Measurement:
        """The window ``[a_ns, b_ns)`` from the ticks the source holds now."""
        return measure_ticks(self.ticks.ticks_between(int(a_ns), int(b_ns)), a_ns, b_ns,
                             source=self.source, name=name)
