"""The activity table: how several proxy processes on one host share one GPU energy counter.

Every proxy started with the same ``--energy-shared PATH`` maps the same small file (put it on a
tmpfs such as ``/dev/shm``) and owns one slot in it. A slot holds the owner's requests in flight and
the integral of that count over time::

    A_i(t) = area_ns + n * (t - t_last_ns)          (request-nanoseconds, t >= t_last_ns)

``CLOCK_MONOTONIC`` is one clock for every process of a host, so each proxy can evaluate every
slot at the same instant. Over an interval [t0, t1] proxy i's share of the GPU is::

    s_i = dA_i / sum_j dA_j        if sum_j dA_j > 0     (dA = A(t1) - A(t0))
        = 1 / live slots           otherwise (nothing in flight anywhere: the idle energy is split evenly)

so sum_i s_i = 1 and a joule of the counter is attributed once over all the proxies
(:mod:`edge_proxy.energy.shared_source` applies the share to each proxy's readings).

Layout (little-endian int64 fields): header ``magic, version, slots, created_ns``, then per slot
``seq, pid, token, n, t_last_ns, area_ns``. Only a slot's owner writes it; ``seq`` is a seqlock
(odd while the owner writes; a reader retries until it reads the same even value before and after).
A slot whose process is gone (``kill(pid, 0)`` fails) counts as empty and is reused. Slots are
claimed under an exclusive ``flock`` on the file.
"""
from __future__ import annotations

import fcntl
import mmap
import os
import secrets
import struct
import time

MAGIC = 0x45444745_41435431          # "EDGEACT1"
VERSION = 1
HEADER = struct.Struct("<qqqq")       # magic, version, slots, created_ns
SLOT = struct.Struct("<qqqqqq")       # seq, pid, token, n, t_last_ns, area_ns
DEFAULT_SLOTS = 64


class TableError(Exception):
    """The table file cannot be used (unreadable, another layout, no free slot)."""


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def shares(before: dict[int, int], after: dict[int, int], live: int) -> dict[int, float]:
    """s_i = dA_i / sum_j dA_j over the slots seen at both ends; 1/live each when sum_j dA_j = 0.

    ``before``/``after``: slot -> A (request-ns) at the interval's two ends. A slot missing at
    either end (claimed or gone in between) takes no share. Negative dA (a reused slot) counts 0.
    """
    d = {k: max(0, after[k] - before[k]) for k in after if k in before}
    total = sum(d.values())
    if total > 0:
        return {k: v / total for k, v in d.items()}
    even = 1.0 / max(1, live)
    return {k: even for k in after}


class ActivityTable:
    """One proxy's handle on the table: it owns ``self.slot`` and reads every slot."""

    def __init__(self, path: str, slots: int = DEFAULT_SLOTS) -> None:
        self.path = path
        try:
            self._fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise TableError(f"cannot open the shared energy table {path}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                self._map = self._open_locked(slots)
                self.slots = HEADER.unpack_from(self._map, 0)[2]
                self.created_ns = HEADER.unpack_from(self._map, 0)[3]
                self.slot = self._claim_locked()
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
        except BaseException:
            os.close(self._fd)
            raise
        self._off = HEADER.size + self.slot * SLOT.size
        self._n = 0
        self._area = 0
        self._t_last = time.monotonic_ns()
        self._seq = 0
        self._write()

    # -- set-up (under the file lock) ------------------------------------------------------
    def _open_locked(self, slots: int) -> mmap.mmap:
        size = os.fstat(self._fd).st_size
        want = HEADER.size + slots * SLOT.size
        if size == 0:
            os.ftruncate(self._fd, want)
            m = mmap.mmap(self._fd, want)
            HEADER.pack_into(m, 0, MAGIC, VERSION, slots, time.monotonic_ns())
            return m
        if size < HEADER.size:
            raise TableError(f"{self.path} is not an edge-proxy energy table ({size} bytes)")
        m = mmap.mmap(self._fd, size)
        magic, version, n, _ = HEADER.unpack_from(m, 0)
        if magic != MAGIC or version != VERSION or size != HEADER.size + n * SLOT.size:
            m.close()
            raise TableError(f"{self.path} is not an edge-proxy energy table of version {VERSION}")
        return m

    def _claim_locked(self) -> int:
        for i in range(self.slots):
            pid = SLOT.unpack_from(self._map, HEADER.size + i * SLOT.size)[1]
            if not _alive(pid):
                self._token = secrets.randbits(62)
                SLOT.pack_into(self._map, HEADER.size + i * SLOT.size, 0, os.getpid(), self._token, 0,
                               time.monotonic_ns(), 0)
                return i
        raise TableError(f"{self.path}: all {self.slots} slots are held by running proxies")

    # -- the owner's side (event loop) -----------------------------------------------------
    def _write(self) -> None:
        m, off = self._map, self._off
        self._seq += 1
        struct.pack_into("<q", m, off, self._seq)                    # odd: writing
        SLOT.pack_into(m, off, self._seq, os.getpid(), self._token, self._n, self._t_last, self._area)
        self._seq += 1
        struct.pack_into("<q", m, off, self._seq)                    # even: done

    def _move(self, dn: int, t_ns: int | None) -> None:
        t = time.monotonic_ns() if t_ns is None else t_ns
        if t > self._t_last:
            self._area += self._n * (t - self._t_last)
            self._t_last = t
        self._n = max(0, self._n + dn)
        self._write()

    def begin(self, t_ns: int | None = None) -> None:
        """One more of this proxy's requests is in flight from ``t_ns`` (default now)."""
        self._move(1, t_ns)

    def end(self, t_ns: int | None = None) -> None:
        """One of this proxy's requests ended at ``t_ns`` (default now)."""
        self._move(-1, t_ns)

    @property
    def in_flight(self) -> int:
        return self._n

    # -- everyone's side (sampler thread) --------------------------------------------------
    def _read_slot(self, i: int) -> tuple[int, int, int, int, int] | None:
        off = HEADER.size + i * SLOT.size
        for _ in range(1000):
            seq, pid, token, n, t_last, area = SLOT.unpack_from(self._map, off)
            if seq % 2 == 0 and struct.unpack_from("<q", self._map, off)[0] == seq:
                return pid, token, n, t_last, area
        return None

    def snapshot(self, t_ns: int) -> tuple[dict[int, int], int]:
        """(slot key -> A(t_ns), live slots). The key is ``slot << 62 | token`` so a slot reused
        by another process between two snapshots is a different key."""
        out: dict[int, int] = {}
        for i in range(self.slots):
            s = self._read_slot(i)
            if s is None:
                continue
            pid, token, n, t_last, area = s
            if pid == 0 or (i != self.slot and not _alive(pid)):
                continue
            out[(i << 62) | token] = area + n * max(0, t_ns - t_last)
        return out, len(out)

    @property
    def key(self) -> int:
        return (self.slot << 62) | self._token

    def close(self) -> None:
        """Give the slot back (a process that dies without closing frees it by dying)."""
        if self._map.closed:
            return
        SLOT.pack_into(self._map, self._off, self._seq + 2, 0, 0, 0, 0, 0)
        self._map.close()
        os.close(self._fd)
