"""Estimated source: no GPU at all. A declared model, never presented as a measurement.

Formula: ``E_mJ(t) = cpu_busy_seconds(t) x watts_per_busy_core x 1000`` where
``cpu_busy_seconds`` is the machine's cumulative busy CPU time over all cores (user + nice +
system + irq + softirq + steal from ``/proc/stat``; the process's own CPU time where /proc is
absent) and ``watts_per_busy_core`` is the declared power of one fully busy core (watts = J/s).
Everything it produces is labelled ``source="estimated"``.
"""
from __future__ import annotations

import os
import time

from edge_proxy.energy.readings import Reading

ESTIMATED_UUID = "cpu-estimated"


def cpu_busy_seconds() -> float:
    """Cumulative busy CPU seconds of the whole machine (all cores), or of this process."""
    try:
        with open("/proc/stat") as f:
            first = f.readline().split()
        if first and first[0] == "cpu":
            vals = [int(v) for v in first[1:9]]
            # user nice system idle iowait irq softirq steal
            busy = vals[0] + vals[1] + vals[2] + vals[5] + vals[6] + vals[7]
            return busy / float(os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        pass
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def estimated_energy_mj(busy_seconds: float, watts_per_busy_core: float) -> int:
    """E_mJ = busy CPU seconds x watts per busy core x 1000 (millijoules)."""
    return int(round(busy_seconds * watts_per_busy_core * 1000.0))


class EstimatedReader:
    source = "estimated"

    def __init__(self, watts_per_busy_core: float) -> None:
        if not watts_per_busy_core > 0:
            raise ValueError(f"estimated watts must be > 0, got {watts_per_busy_core}")
        self.watts = float(watts_per_busy_core)
        self.gpu_uuids = [ESTIMATED_UUID]
        self._last_busy = cpu_busy_seconds()
        self._last_t = time.monotonic_ns()

    def read(self) -> list[Reading]:
        t = time.monotonic_ns()
        busy = cpu_busy_seconds()
        power = 0.0
        if t > self._last_t:
            power = max(0.0, busy - self._last_busy) * self.watts / ((t - self._last_t) / 1e9)
        self._last_busy, self._last_t = busy, t
        return [Reading(t_ns=t, energy_mj={ESTIMATED_UUID: estimated_energy_mj(busy, self.watts)},
                        power_w={ESTIMATED_UUID: power})]

    def close(self) -> None:
        return None
