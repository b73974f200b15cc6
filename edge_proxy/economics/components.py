"""What economics reads of the other components, as protocols (dependencies arrive in the
observer's constructor, never looked up in ``runtime.components``).

Owns only these interfaces. Must not import the components themselves (economics stays free of the
cold-start and energy packages' internals).
"""
from __future__ import annotations

from typing import Any, Protocol, Sequence


class ColdStartRecord(Protocol):
    """What economics reads of one finished cold start (``edge_proxy.coldstart.record.ColdStart``)."""

    id: Any
    outcome: str
    finalized: bool                 # its energy window is closed

    @property
    def seconds(self) -> float | None: ...

    @property
    def tax_joules(self) -> tuple[float | None, str]: ...


class ColdStartHistory(Protocol):
    """The cold-start gate as economics sees it: its recent cold starts, oldest first."""

    @property
    def history(self) -> Sequence[ColdStartRecord]: ...


class EnergyComponent(Protocol):
    """The energy component as economics sees it (``edge_proxy.energy.factory.EnergyComponent``)."""

    source: str
    sampler: Any
