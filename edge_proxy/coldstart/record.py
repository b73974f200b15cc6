"""The cold-start record: one plain dataclass per cold start (milestones, outcome, energy window,
tax), the one type shared by the gate (which fills it), ``GET /edge/cold-starts`` (``to_dict``)
and economics (which reads the finished ones from ``gate.history``).

Owns: the record's fields and their JSON form. Must not: import Prometheus or asyncio, compute
tax formulas (:mod:`edge_proxy.coldstart.tax` calls the formulas module), or measure anything.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from edge_proxy.coldstart.phases import ColdStartTimeline, segment_seconds
from edge_proxy.energy.window import Measurement


@dataclass
class ColdStart:
    """One cold start: its milestones, outcome, energy and tax."""

    id: int
    reason: str                                  # request | restart | startup
    timeline: ColdStartTimeline
    outcome: str | None = None                   # ready | timeout | error
    error: str | None = None
    backend_startup: dict[str, Any] = field(default_factory=dict)    # /info startup (epoch s)
    backend_milestones_ns: dict[str, int] = field(default_factory=dict)
    load_energy_joules: float | None = None      # model server's own measurement (/info)
    energy: Measurement | None = None            # proxy's source over [hold_start, end)
    released: int = 0
    open_requests: int = 0
    held_max: int = 0
    finalized: bool = False
    tax_energy_ratio: float | None = None
    tax_time_ratio: float | None = None
    break_even_idle_seconds: float | None = None
    mean_request_joules: float | None = None
    mean_request_seconds: float | None = None
    idle_watts: float | None = None

    @property
    def end_ns(self) -> int | None:
        return self.timeline.first_token or self.timeline.ready

    @property
    def seconds(self) -> float | None:
        e = self.end_ns
        return None if e is None else (e - self.timeline.hold_start) / 1e9

    @property
    def energy_joules(self) -> float | None:
        return None if self.energy is None else self.energy.joules

    @property
    def energy_source(self) -> str:
        return "none" if self.energy is None else self.energy.source

    @property
    def tax_joules(self) -> tuple[float | None, str]:
        """Energy used for the tax: measured over the whole cold start, else the server's load energy."""
        if self.energy is not None:
            return self.energy.joules, self.energy.source
        if self.load_energy_joules is not None:
            return self.load_energy_joules, "model_server_load"
        return None, "none"

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "reason": self.reason,
            "outcome": self.outcome,
            "error": self.error,
            "milestones_seconds": self.timeline.offsets_seconds(),
            "milestone_sources": dict(self.timeline.sources),
            "phases_seconds": segment_seconds(self.timeline),
            "seconds": self.seconds,
            "backend_startup_epoch_seconds": self.backend_startup,
            "energy_joules": self.energy_joules,
            "energy_source": self.energy_source,
            "energy_kind": None if self.energy is None else self.energy.kind,
            "energy_gap": None if self.energy is None else self.energy.gap,
            "load_energy_joules": self.load_energy_joules,
            "released_requests": self.released,
            "held_max": self.held_max,
            "mean_request_joules": self.mean_request_joules,
            "mean_request_seconds": self.mean_request_seconds,
            "idle_watts": self.idle_watts,
            "tax_energy_ratio": self.tax_energy_ratio,
            "tax_time_ratio": self.tax_time_ratio,
            "keep_warm_break_even_idle_seconds": self.break_even_idle_seconds,
        }
