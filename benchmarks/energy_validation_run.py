"""The state one energy_validation.py run shares between its checks: the in-process proxy's energy
component (ledger, sampler), the finalized request records, the direct counter reader, and the two
steps every check uses (settle: let in-flight work and pending ticks finish; edge: the ledger and the
counter at a window edge).

Owns: that shared state. Must NOT: run a check, or start/stop the proxy (energy_validation.py does).
"""
from __future__ import annotations

import argparse
import asyncio
import random
import time
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console

console = Console(stderr=True)


class SetupError(Exception):
    pass


class Finals:
    """Observer collecting finalized request records by request id."""

    def __init__(self) -> None:
        self.by_id: dict[str, Any] = {}

    def on_request_start(self, rec: Any) -> None: ...
    def on_tokens(self, rec: Any, n: int, t_ns: int) -> None: ...
    def on_request_end(self, rec: Any) -> None: ...

    async def finalize(self, rec: Any) -> None:
        return None

    def on_request_final(self, rec: Any) -> None:
        # The benchmark names its requests with x-request-id: since the proxy keys requests by its
        # own id, the client's id is rec.client_request_id (a label).
        self.by_id[rec.client_request_id or rec.request_id] = rec


def make_reader(source: str, uuids: list[str], args: argparse.Namespace) -> Any:
    if source == "nvml":
        from edge_proxy.energy.nvml_source import NvmlReader
        return NvmlReader(uuids or None)
    if source == "estimated":
        from edge_proxy.energy.estimated_source import EstimatedReader
        return EstimatedReader(args.estimated_watts)
    return None


@dataclass
class Run:
    args: argparse.Namespace
    ms_url: str
    uuids: list[str]
    model: str
    max_tokens_cap: int
    runtime: Any
    finals: Finals
    ledger: Any
    sampler: Any
    direct: Any
    gpu_ids: list[str] = field(default_factory=list)
    rnd: random.Random = field(default_factory=lambda: random.Random(0))
    state: dict[str, int] = field(default_factory=dict)

    @property
    def px(self) -> str:
        return str(self.runtime.url)

    async def settle(self) -> None:
        await self.runtime.drain()
        deadline = time.monotonic() + 5
        await asyncio.sleep(2 * self.args.period + 0.2)
        while self.ledger.pending_ticks and time.monotonic() < deadline:
            await asyncio.sleep(self.args.period)

    def edge(self) -> dict[str, Any]:
        ledger, direct = self.ledger, self.direct
        snap = ledger.snapshot()
        # (+ foreign: busy ticks with none of the proxy's requests in flight, e.g. a warm-up)
        e: dict[str, Any] = {"ledger_active_plus_idle_j": snap.active_joules + snap.idle_joules + snap.foreign_joules,
                             "ledger_measured_j": snap.measured_joules, "pending_j": snap.pending_joules,
                             "tick_end_ns": ledger.newest_tick_end_ns}
        if direct is not None:
            (rd,) = direct.read()
            e["direct_counter_j"] = sum(rd.energy_mj.values()) / 1000.0
            e["direct_t_ns"] = rd.t_ns
        return e
