"""Estimated source: no GPU at all. A declared model, never presented as a measurement.

Formula: ``E_mJ(t) = cpu_busy_seconds(t) x watts_per_busy_core x 1000`` where
``watts_per_busy_core`` is the declared power of one fully busy core (watts = J/s) and
``cpu_busy_seconds`` is cumulative busy CPU time of one scope (``scope``, exported as a label):

- ``backend-process-tree``: the backend's processes only (the one the proxy spawned, or the one
  listening on the backend URL's port on this machine, and their descendants: user + system), so
  other tenants' CPU is not billed to the model;
- ``whole-machine``: every core of the machine (user + nice + system + irq + softirq + steal from
  ``/proc/stat``; the proxy's own CPU time where /proc is absent), when the backend is not on this
  machine, no process of it can be found, or ``energy.estimated_scope`` says so.

Scope changes (the backend starts, stops, moves) never make the counter jump: it accumulates the
per-read deltas of the current scope. Everything it produces is labelled ``source="estimated"``.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable

from edge_proxy.energy.readings import Reading

ESTIMATED_UUID = "cpu-estimated"
SCOPES = ("auto", "backend", "machine")
SCOPE_TREE = "backend-process-tree"
SCOPE_MACHINE = "whole-machine"
log = logging.getLogger("edge_proxy.energy")


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
    """``scope``: ``auto`` (the backend's process tree when the backend is on this machine and a
    process of it is found or spawned, else the whole machine), ``backend`` (the tree only: 0 W
    while no backend process runs), ``machine``. ``spawned_pid``: the pid of the backend the
    proxy started, if any (set after construction by the energy factory)."""

    source = "estimated"

    def __init__(self, watts_per_busy_core: float, scope: str = "machine",
                 backend_url: str | None = None) -> None:
        if not watts_per_busy_core > 0:
            raise ValueError(f"estimated watts must be > 0, got {watts_per_busy_core}")
        if scope not in SCOPES:
            raise ValueError(f"estimated scope must be one of {', '.join(SCOPES)}, got {scope!r}")
        self.watts = float(watts_per_busy_core)
        self.gpu_uuids = [ESTIMATED_UUID]
        self.requested_scope = scope
        self.spawned_pid: Callable[[], int | None] | None = None
        self._tree = None
        self._pc: Any = None                    # edge_proxy.energy.process_cpu (not for scope machine)
        self._port: int | None = None
        self._port_pid: int | None = None
        self._port_fd: int | None = None        # a pidfd of _port_pid: its liveness without /proc reads
        self._port_checked = -1e9
        if scope != "machine":
            from edge_proxy.energy import process_cpu

            self._pc = process_cpu                  # (imported once: _root_pid runs on every read)
            self._port = process_cpu.local_port(backend_url)
            self._tree = process_cpu.ProcessTreeCpu(self._root_pid)
        self.scope = SCOPE_MACHINE
        self._total_busy = 0.0
        self._last_busy = self._busy_now()
        self._last_t = time.monotonic_ns()

    def _root_pid(self) -> int | None:
        """The spawned backend's pid, else the pid listening on the backend's local port (looked
        up again at most once a second while none is known or it has exited)."""
        pc = self._pc
        pid = self.spawned_pid() if self.spawned_pid is not None else None
        if pid or self._port is None:
            return pid
        if self._port_pid is not None and pc.pid_alive(self._port_pid, self._port_fd):
            return self._port_pid
        if time.monotonic() - self._port_checked >= 1.0:
            self._port_checked = time.monotonic()
            self._port_pid = pc.listening_pid(self._port)
            pc.close_pidfd(self._port_fd)
            self._port_fd = None if self._port_pid is None else pc.open_pidfd(self._port_pid)
        return self._port_pid

    def _busy_now(self) -> float:
        """Busy seconds in the scope chosen now (sets ``self.scope``)."""
        if self._tree is not None:
            busy = self._tree.busy_seconds()
            use_tree = self._tree.root is not None or self.requested_scope == "backend" or (
                self.spawned_pid is not None and self._port is not None)
            scope = SCOPE_TREE if use_tree else SCOPE_MACHINE
            if scope != self.scope:
                log.info("estimated energy: scope %s", scope)
                self.scope = scope
            if use_tree:
                return busy
        return cpu_busy_seconds()

    def read(self) -> list[Reading]:
        t = time.monotonic_ns()
        before = self.scope
        busy = self._busy_now()
        delta = max(0.0, busy - self._last_busy) if self.scope == before else 0.0
        power = delta * self.watts / ((t - self._last_t) / 1e9) if t > self._last_t else 0.0
        self._total_busy += delta
        self._last_busy, self._last_t = busy, t
        return [Reading(t_ns=t, energy_mj={ESTIMATED_UUID: estimated_energy_mj(self._total_busy, self.watts)},
                        power_w={ESTIMATED_UUID: power})]

    def close(self) -> None:
        if self._tree is not None:
            self._tree.close()
        if self._port_fd is not None:
            from edge_proxy.energy.process_cpu import close_pidfd

            close_pidfd(self._port_fd)
            self._port_fd = None
