"""Busy CPU seconds of the backend's process tree, for the estimated energy source.

The backend's root process is the one the proxy spawned (``--spawn``) or, when the backend URL is
on this machine, the process listening on its port (psutil). Its tree is the root and all its
descendants, refreshed at most once per ``refresh_seconds``. The cumulative busy time is the sum,
over every process seen in the tree, of its last-read user + system CPU seconds (keyed by pid and
start time, so a reused pid is a new process): it never goes down, and a process that exits keeps
the time it was last seen with (at most one sampling period of its CPU is missed).

On Linux a process's CPU seconds are read from its process CPU-time clock (``clock_gettime`` on
the clock id the kernel derives from the pid: all threads, nanosecond resolution, about 1 µs per
read); ``/proc``'s user + system times (psutil) count in 10 ms clock ticks, so a request shorter
than a tick could be estimated at 0 J. Elsewhere, or if the clock cannot be read, psutil's times.

Cost per read (issue 17): whether the tree's processes still run is asked of a pidfd (one signal-0
system call on a descriptor pinned to the very process) rather than by re-reading ``/proc/PID/stat``
(psutil's ``is_running``: ~0.3 ms each here, cold); only when the pidfd says the process is gone
does psutil answer, so the answers are psutil's. The tree is listed from the kernel's per-thread
``children`` files, not by reading every process's ``stat`` on the machine; listed again (once a
second), a process whose pidfd is still live is kept as it was (its ``Process`` and pidfd): only a
new child costs a pidfd and a read of its ``stat``.
"""
from __future__ import annotations

import ipaddress
import logging
import os
import signal
import socket
import sys
import time
from typing import Callable
from urllib.parse import urlsplit

import psutil

log = logging.getLogger("edge_proxy.energy")


def local_port(url: str | None) -> int | None:
    """The port of ``url`` when its host is this machine (loopback, unspecified or a local
    address), else None."""
    if not url:
        return None
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        return None
    host = (parts.hostname or "").strip("[]")
    if host in ("localhost", socket.gethostname()):
        return port
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    if ip.is_loopback or ip.is_unspecified:
        return port
    local = {a.address.split("%")[0] for addrs in psutil.net_if_addrs().values() for a in addrs}
    return port if host in local else None


def listening_pid(port: int) -> int | None:
    """Pid of the process listening on TCP ``port`` on this machine (None if none or not visible)."""
    try:
        conns = psutil.net_connections(kind="tcp")
    except (psutil.Error, OSError):
        return None
    for c in conns:
        if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid:
            return int(c.pid)
    return None


def process_cpu_clock_id(pid: int) -> int:
    """The Linux clock id of process ``pid``'s CPU-time clock (what glibc's
    ``clock_getcpuclockid`` returns: ``(~pid << 3) | CPUCLOCK_SCHED``, CPUCLOCK_SCHED = 2)."""
    return ((~pid) << 3) | 2


def process_cpu_seconds(proc: psutil.Process, pid: int | None = None) -> float:
    """CPU seconds (all threads, user + system) used so far by ``proc`` (``pid``: its pid, when
    the caller has it): the kernel's nanosecond process clock where it can be read, else psutil's
    clock-tick times."""
    if _HAS_CPU_CLOCK:
        try:
            return time.clock_gettime(process_cpu_clock_id(proc.pid if pid is None else pid))
        except OSError:
            pass                    # exited, or a kernel without process clocks: fall back
    t = proc.cpu_times()
    return t.user + t.system


_HAS_CPU_CLOCK = sys.platform.startswith("linux") and hasattr(time, "clock_gettime")
_HAS_CHILDREN_FILES = os.path.exists(f"/proc/{os.getpid()}/task/{os.getpid()}/children")


def _child_pids(pid: int) -> list[int]:
    """Pids whose parent is ``pid`` (any of its threads), ascending: the kernel's per-thread
    ``/proc/PID/task/TID/children`` lists (gone: none)."""
    kids: list[int] = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return kids
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children", "rb") as f:
                kids += map(int, f.read().split())
        except OSError:
            continue
    return sorted(set(kids))


_HAS_PIDFD = hasattr(os, "pidfd_open") and hasattr(signal, "pidfd_send_signal")


def open_pidfd(pid: int) -> int | None:
    """A pidfd of process ``pid`` (it stays bound to that process, whatever reuses the pid later),
    or None (no pidfds here, or no such process)."""
    if not _HAS_PIDFD:
        return None
    try:
        return os.pidfd_open(pid)
    except OSError:
        return None


def close_pidfd(fd: int | None) -> None:
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass


def pidfd_exists(fd: int | None) -> bool:
    """True when the process of ``fd`` still exists (a zombie too); False when it is gone, or
    cannot be told (then ask psutil)."""
    if fd is None:
        return False
    try:
        signal.pidfd_send_signal(fd, 0)
        return True
    except OSError:
        return False


Known = dict[int, tuple[psutil.Process, int | None]]


def descendants(root: psutil.Process, known: Known | None = None) -> list[tuple[psutil.Process, int | None]]:
    """``root.children(recursive=True)``: the same processes in the same order (depth first, a pid
    older than ``root`` left out as reused), each with a pidfd opened before its ``Process`` (so a
    live pidfd means that very process runs), read from the tree's own ``children`` files (a few
    reads) instead of psutil's scan of every process on the machine; psutil's where /proc has no
    such files (no pidfds then). ``known`` (optional): pid -> (``Process``, pidfd) of an earlier
    listing of the same root; a child whose pidfd there is still live is that very process, and is
    returned as it was (the same objects: no new pidfd, no read of its ``stat``)."""
    if not _HAS_CHILDREN_FILES:
        return [(p, None) for p in root.children(recursive=True)]
    ctime = root.create_time()
    out: list[tuple[psutil.Process, int | None]] = []
    seen: set[int] = set()
    stack = [root.pid]
    while stack:
        pid = stack.pop()
        if pid in seen:
            continue
        seen.add(pid)
        for kid in _child_pids(pid):
            had = known.get(kid) if known else None
            if had is not None and pidfd_exists(had[1]):
                out.append(had)            # (it passed the age check against this root already)
                stack.append(kid)
                continue
            fd = open_pidfd(kid)
            try:
                child = psutil.Process(kid)
                if ctime <= child.create_time():
                    out.append((child, fd))
                    stack.append(kid)
                    continue
            except (psutil.NoSuchProcess, psutil.ZombieProcess):
                pass
            close_pidfd(fd)
    return out


def pid_alive(pid: int, fd: int | None = None) -> bool:
    """``psutil.pid_exists(pid)``; ``fd`` (optional): a pidfd opened for ``pid`` (only thread-group
    leaders have one): while its process exists so does a process with that pid, no /proc read."""
    return pidfd_exists(fd) or psutil.pid_exists(pid)


class ProcessTreeCpu:
    """Cumulative busy CPU seconds of one process tree, its root found by ``root_pid()`` (called
    on every read); the descendants are listed again when the root changes, a process exits, or
    ``refresh_seconds`` passed."""

    def __init__(self, root_pid: Callable[[], int | None], refresh_seconds: float = 1.0) -> None:
        self.root_pid = root_pid
        self.refresh_seconds = refresh_seconds
        self._procs: list[psutil.Process] = []
        self._fds: list[int | None] = []                     # a pidfd per process of _procs (or None)
        self._root: int | None = None
        self._refreshed = -1e9
        self._keys: list[tuple[int, float] | None] = []      # (pid, create_time) per process of _procs
        self._last: dict[tuple[int, float], float] = {}     # (pid, create_time) -> busy seconds
        self._gone = 0.0                                     # busy seconds of processes that left the tree

    @property
    def root(self) -> int | None:
        """The root pid of the last refresh (None: no backend process found)."""
        return self._root

    def _known(self, pid: int) -> Known:
        """The last listing by pid (with pidfds), when its root is ``pid`` and still that very
        process (its pidfd is live); else empty. Only with pidfds: without them a pid's identity
        cannot be told without reading its ``stat`` again."""
        if pid != self._root or not self._procs or not pidfd_exists(self._fds[0]):
            return {}
        return {p.pid: (p, fd) for p, fd in zip(self._procs, self._fds) if fd is not None}

    def _refresh(self) -> None:
        now = time.monotonic()
        pid = self.root_pid()          # cheap: a spawned pid, or a port lookup throttled by the caller
        if pid == self._root and now - self._refreshed < self.refresh_seconds:
            for p, fd in zip(self._procs, self._fds):
                if not (pidfd_exists(fd) or p.is_running()):
                    break                      # one exited: list the tree again
            else:
                return
        self._refreshed = now
        found: list[tuple[psutil.Process, int | None]] = []
        known = self._known(pid) if pid else {}
        if pid:
            had = known.get(pid)
            fd = had[1] if had is not None else open_pidfd(pid)    # before the Process: see descendants
            try:
                root = had[0] if had is not None else psutil.Process(pid)
                found = [(root, fd), *descendants(root, known)]
            except psutil.Error:
                if had is None:
                    close_pidfd(fd)            # (a reused one is closed with the old listing below)
                found, pid = [], None
        if pid != self._root:
            log.info("estimated energy: backend process tree root %s", pid if pid else "not found")
        reused = {f for _, f in found}
        for f in self._fds:
            if f not in reused:
                close_pidfd(f)
        procs = [p for p, _ in found]
        self._root, self._procs, self._fds = pid, procs, [f for _, f in found]
        keys: list[tuple[int, float] | None] = []
        for p in procs:
            try:
                keys.append((p.pid, p.create_time()))
            except psutil.Error:
                keys.append(None)              # asked again on each read
        self._keys = keys
        live = set(keys)
        for key in [k for k in self._last if k not in live]:
            self._gone += self._last.pop(key)

    def busy_seconds(self) -> float:
        self._refresh()
        last = self._last
        for p, key in zip(self._procs, self._keys):
            try:
                if key is None:
                    key = (p.pid, p.create_time())
                busy = process_cpu_seconds(p, key[0])
            except psutil.Error:
                continue
            last[key] = max(last.get(key, 0.0), busy)
        return self._gone + sum(last.values())

    def close(self) -> None:
        for f in self._fds:
            close_pidfd(f)
        self._fds = [None] * len(self._procs)
