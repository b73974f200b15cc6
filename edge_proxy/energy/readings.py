"""Value types shared by the energy sources, the sampler and the ledger.

All times are local ``time.monotonic_ns()`` values (nanoseconds). Energy counters are cumulative
millijoules (NVML's unit); tick energies are joules.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class Reading:
    """One read of every configured GPU's cumulative energy counter.

    ``energy_mj`` maps GPU UUID to the counter (mJ since driver load, or the source's own origin).
    A GPU missing from ``energy_mj`` failed to read this time. ``error`` set means the whole read
    failed (the sampler logs it once and records a gap). ``at_rest``: every GPU read was at rest
    (utilization 0 over the driver's last sample period); False: at least one was busy; None: the
    source cannot tell (estimated, remote, traces recorded without utilization). ``share``: set by the
    shared source only (several proxies on one counter): this proxy's share of the counter's increase
    since the previous read (0..1); None: the whole counter is this proxy's.
    """

    t_ns: int
    energy_mj: dict[str, int] = field(default_factory=dict)
    power_w: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    at_rest: bool | None = None
    share: float | None = None      # shared source: this proxy's share of the counter since the last read


@dataclass(frozen=True)
class Tick:
    """Energy measured between two consecutive readings: [t0_ns, t1_ns).

    ``joules`` is the sum over GPUs after clamping (a counter that went down contributes 0 J and
    sets ``gap``). ``gap`` also marks a tick that spans failed reads. ``at_rest``: True when every
    read in the tick said the GPUs were at rest, False when one said busy, None when unknown.
    ``share``: the part of the GPU this proxy holds over the tick (time-weighted over its reads; 1.0
    unless the source is shared), so its idle baseline is ``P_idle * idle_seconds``.
    """

    t0_ns: int
    t1_ns: int
    joules: float
    joules_by_gpu: dict[str, float]
    gap: bool = False
    at_rest: bool | None = None
    share: float = 1.0

    @property
    def dt_seconds(self) -> float:
        return (self.t1_ns - self.t0_ns) / 1e9

    @property
    def idle_seconds(self) -> float:
        """dt * share (s): the time over which this proxy carries the GPU's idle power."""
        return self.dt_seconds * self.share


class ReaderError(Exception):
    """A source could not be initialised (bad UUID, no NVML, unreadable trace)."""


class EnergyReader(Protocol):
    """What the sampler thread polls. ``read`` may block (it runs on the sampler thread only)."""

    source: str
    gpu_uuids: list[str]

    def read(self) -> list[Reading]: ...

    def close(self) -> None: ...


def counter_delta_joules(prev_mj: int, cur_mj: int) -> tuple[float, bool]:
    """Energy between two cumulative counter values.

    Formula: ``dE = (cur_mj - prev_mj) / 1000`` joules. A counter that went down (driver reload,
    reset or wrap) is clamped: ``dE = 0`` and the second value is ``True`` (a gap).
    """
    if cur_mj < prev_mj:
        return 0.0, True
    return (cur_mj - prev_mj) / 1000.0, False


def combine_at_rest(a: bool | None, b: bool | None) -> bool | None:
    """At rest over two reads: busy if either was busy, at rest if both were, else unknown."""
    if a is False or b is False:
        return False
    if a is None or b is None:
        return a if b is None else b
    return True


def merge_ticks(a: Tick, b: Tick) -> Tick:
    """Two consecutive ticks as one: [a.t0, b.t1), energies added (per GPU too)."""
    by_gpu = dict(a.joules_by_gpu)
    for u, j in b.joules_by_gpu.items():
        by_gpu[u] = by_gpu.get(u, 0.0) + j
    share = a.share
    if a.share != b.share:          # time-weighted: (s_a dt_a + s_b dt_b) / (dt_a + dt_b)
        dt = b.t1_ns - a.t0_ns
        share = (a.share * (a.t1_ns - a.t0_ns) + b.share * (b.t1_ns - b.t0_ns)) / dt if dt > 0 else b.share
    return Tick(a.t0_ns, b.t1_ns, a.joules + b.joules, by_gpu, a.gap or b.gap,
                combine_at_rest(a.at_rest, b.at_rest), share)
