"""Test support for the energy ledger's tests: ticks in milliseconds and the conservation check every test ends with.

Used by tests/test_energy_ledger*.py. Must NOT hold tests.
"""
from __future__ import annotations

import math

from edge_proxy.energy.ledger import Ledger
from edge_proxy.energy.readings import Tick

MS = 1_000_000


def tick(t0_ms: float, t1_ms: float, joules: float, gap: bool = False) -> Tick:
    return Tick(int(t0_ms * MS), int(t1_ms * MS), joules, {"GPU-x": joules}, gap)


def assert_conserved(ledger: Ledger, rel: float = 1e-9) -> None:
    t = ledger.snapshot()
    lhs = t.active_joules + t.idle_joules + t.foreign_joules + t.pending_joules
    assert math.isclose(lhs, t.measured_joules, rel_tol=rel, abs_tol=1e-9), (lhs, t.measured_joules)
    assert t.full_joules <= t.active_joules + t.idle_joules + 1e-9
    assert t.idle_unattributed_joules >= -1e-9
