"""Value types of the energy ledger: a request's energy, the totals, and the core's records of
open requests and pending ticks."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from edge_proxy.energy.apportion import ReqView, prefill_share
from edge_proxy.energy.readings import Tick


@dataclass
class RequestEnergy:
    """A request's attributed energy as the ledger knows it now. ``prefill_joules`` +
    ``decode_joules`` = ``full_joules``. Streams (token times known): prefill is the request's full
    share of the ticks at or before the one holding its first token (tick t0 <= t_first), decode of
    the ticks after it. One response: split by its weights (``apportion.prefill_share``); None while
    its token counts are unknown."""

    active_joules: float
    full_joules: float
    attribution: str
    final: bool
    prefill_joules: float | None = None
    decode_joules: float | None = None


@dataclass
class LedgerTotals:
    measured_joules: float = 0.0          # every tick received
    measured_by_gpu: dict[str, float] = field(default_factory=dict)
    pending_joules: float = 0.0           # received, not split yet
    idle_joules: float = 0.0              # idle_k of split ticks (all idle power)
    idle_unattributed_joules: float = 0.0 # idle not carried by any request's full energy
    active_joules: float = 0.0            # sum of active shares
    full_joules: float = 0.0              # sum of full shares
    ticks_split: int = 0
    ticks_forced: int = 0
    ticks_gap: int = 0
    by_model: dict[tuple[str, str], list[float]] = field(default_factory=dict)   # (model, attribution) -> [active, full]
    idle_watts: float | None = None
    foreign_joules: float = 0.0           # busy GPU, none of this proxy's requests in flight (above idle)
    ticks_foreign: int = 0
    idle_power_source: str = "default"    # configured | learned_at_rest | learned_no_requests | default

    def copy(self) -> "LedgerTotals":
        return LedgerTotals(self.measured_joules, dict(self.measured_by_gpu), self.pending_joules,
                            self.idle_joules, self.idle_unattributed_joules, self.active_joules,
                            self.full_joules, self.ticks_split, self.ticks_forced, self.ticks_gap,
                            {k: list(v) for k, v in self.by_model.items()}, self.idle_watts,
                            self.foreign_joules, self.ticks_foreign, self.idle_power_source)


@dataclass(eq=False, slots=True)
class Req:
    view: ReqView
    model: str
    attribution: str
    forwarded: Callable[[], int | None] | None = None   # when the request left for the backend
    active: float = 0.0
    full: float = 0.0
    prefill: float = 0.0                                 # full joules of ticks at/before the first token
    final: bool = False
    released: bool = False
    refs: int = 0                                        # pending ticks listing it
    prefill_weight: float = 1.0                          # the ledger's, for the by-weight phase split
    key: tuple[str, str] = ("", "")                      # (model, attribution): the by-model totals' key
    blocking: list["PendingTick"] = field(default_factory=list)   # pending ticks waiting for its weight
    dirty: bool = False                                  # changed since it blocked them

    def __post_init__(self) -> None:
        self.key = (self.model, self.attribution)

    def energy(self, final: bool | None = None) -> RequestEnergy:
        prefill = self.prefill_part(self.full, self.prefill)
        return RequestEnergy(self.active, self.full, self.attribution, self.final if final is None else final,
                             prefill, None if prefill is None else self.full - prefill)

    def prefill_part(self, full: float, by_ticks: float) -> float | None:
        """Prefill joules of ``full``: by ticks when token times are known (``by_ticks``: the full
        shares of ticks up to the first token's); else (one response, no token times) by weight,
        full x pw P / (pw P + O) with P prompt and O output tokens; None while they are unknown."""
        v = self.view
        if v.token_times_known:
            return by_ticks
        if v.prompt_tokens is None or v.end_ns is None:
            return None
        out = v.output_tokens if v.output_tokens is not None else v.output_seen
        return full * prefill_share(v.prompt_tokens, out, self.prefill_weight)

    def in_flight(self) -> bool:
        """Move the start to when it was forwarded; False while it is held (not sent yet)."""
        if self.forwarded is None:
            return True
        fwd = self.forwarded()
        v = self.view
        if fwd is None:
            if v.end_ns is None:
                return False             # held by the gate: not in flight yet
            v.start_ns = v.end_ns        # ended without being sent (rejected): no time in flight
            self.forwarded = None
            return True
        if fwd > v.start_ns:
            v.start_ns = fwd if v.end_ns is None else min(fwd, v.end_ns)
        if v.end_ns is not None or fwd <= v.start_ns:
            self.forwarded = None        # settled: no need to ask again
        return True


@dataclass(eq=False, slots=True)
class PendingTick:
    tick: Tick
    members: list[Req] | None = None      # candidates, listed when the tick is settled
    blockers: set[Req] = field(default_factory=set)    # requests whose weight it waits for
    wake_at: int | None = None            # newest tick end at which a blocker's prefill window is out of reach
