"""Shared source: one GPU counter read by several proxies on one host, each keeping its share.

Wraps the configured reader (``nvml``, ``replay``, ``remote``, ``estimated``). Each reading's counter
increase is scaled by this proxy's share of the interval since the previous reading (the activity
table, :mod:`edge_proxy.energy.shared_table`)::

    E_virtual += dE_counter * s_i(t_prev, t)          (per GPU, mJ)

and the reading carries ``share = s_i`` so the ledger scales idle power the same way
(``P_idle * dt * share``: the idle energy of an instant is split like the rest). The proxy then
works unchanged on its virtual counter: its ledger splits its share over its own requests, and the
counters of all the proxies on one table add up to the GPU's counter.

A reset of the real counter (it went down) is passed on as a reset of the virtual one (a gap).
:class:`SharedActivityObserver` keeps this proxy's slot in the table up to date: in flight from
``on_request_start`` to ``on_request_end``.
"""
from __future__ import annotations

from dataclasses import replace

from edge_proxy.energy.readings import EnergyReader, Reading
from edge_proxy.energy.shared_table import ActivityTable, shares
from edge_proxy.proxy.hooks import BaseObserver, RequestRecord


class SharedReader:
    """An :class:`EnergyReader` that hands out this proxy's share of ``inner``'s counter."""

    def __init__(self, inner: EnergyReader, table: ActivityTable) -> None:
        self.inner = inner
        self.table = table
        self.source = inner.source
        self.gpu_uuids = inner.gpu_uuids
        self._raw: dict[str, int] = {}
        self._virt: dict[str, float] = {}
        self._snap: dict[int, int] | None = None
        self.last_share = 1.0

    def _share(self, t_ns: int) -> float:
        snap, live = self.table.snapshot(t_ns)
        prev, self._snap = self._snap, snap
        if prev is None:
            return 1.0 / max(1, live)
        return shares(prev, snap, live).get(self.table.key, 0.0)

    def _convert(self, r: Reading) -> Reading:
        s = self._share(r.t_ns)
        self.last_share = s
        out: dict[str, int] = {}
        for u, mj in r.energy_mj.items():
            prev = self._raw.get(u)
            self._raw[u] = mj
            if prev is None:
                v = float(mj)                       # the virtual counter starts at the real one
            elif mj < prev:                         # reset: the virtual counter goes down too
                v = min(float(mj), self._virt[u] - 1.0)
            else:
                v = self._virt[u] + (mj - prev) * s
            self._virt[u] = v
            out[u] = int(v)
        return replace(r, energy_mj=out, share=s)

    def read(self) -> list[Reading]:
        return [r if r.error is not None else self._convert(r) for r in self.inner.read()]

    def close(self) -> None:
        try:
            self.inner.close()
        finally:
            self.table.close()


class SharedActivityObserver(BaseObserver):
    """Counts this proxy's requests in flight in its slot of the activity table."""

    def __init__(self, table: ActivityTable) -> None:
        self.table = table

    def on_request_start(self, rec: RequestRecord) -> None:
        self.table.begin()

    def on_request_end(self, rec: RequestRecord) -> None:
        self.table.end()
