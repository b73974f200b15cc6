"""Process-wide settings for a long-running server process (the proxy, the model server).

Standard library only: ``model_server`` uses :func:`reserve_fd_table` too.
"""
from __future__ import annotations

import gc
import os
import resource
import sys

SWITCH_INTERVAL_SECONDS = 0.0005
FD_TABLE_SLOTS = 4096
NOFILE_CAP = 1 << 20        # used when the hard limit is "unlimited" (Linux's default fs.nr_open)


def raise_nofile_limit() -> tuple[int, int]:
    """Raise this process's soft ``RLIMIT_NOFILE`` to its hard limit; returns (old soft, new soft).

    A server holds one descriptor per client connection and one per backend connection: at the
    soft limit systemd and many shells still give (1024), 1,000 streams through the proxy ran out
    (docs/benchmarks.md, Reliability). The hard limit is what the administrator allows; raising the
    soft limit up to it needs no privilege (as nginx's ``worker_rlimit_nofile`` or Go's runtime do).
    An unlimited hard limit is capped at :data:`NOFILE_CAP`. Children (``--spawn``) inherit it.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = NOFILE_CAP if hard == resource.RLIM_INFINITY else int(hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (OSError, ValueError):
            return int(soft), int(soft)
        return int(soft), target
    return int(soft), int(soft)


def reserve_fd_table(slots: int = FD_TABLE_SLOTS) -> int:
    """Grow this process's file-descriptor table to about ``slots`` entries now; returns the number
    of slots reserved (0 where nothing was done).

    Linux doubles the table when a new descriptor does not fit. In a process with several threads
    each doubling waits for an RCU grace period (``synchronize_rcu`` in ``expand_fdtable``) inside
    the ``socket``/``accept`` call that needed it: on a 16-vCPU VM that call took 13-20 ms, and the
    event loop with it (H100 host, 2026-11-26: 6 of 16 simultaneous requests reached the backend
    that much later; docs/benchmarks.md, Energy validation). A table grown once, up front, never has
    to double while serving below ``slots`` descriptors; done before the process starts threads it
    costs no grace period at all. Memory: 8 bytes per slot plus bitmaps (~33 KiB for 4096).

    The table is grown by duplicating a descriptor to the lowest free number at or above
    ``slots - 1`` (``F_DUPFD``: never replaces an open descriptor) and closing it again. Bounded by
    the soft ``RLIMIT_NOFILE``.
    """
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    n = slots if soft == resource.RLIM_INFINITY else min(slots, int(soft))
    if n <= 64:
        return 0
    import fcntl
    try:
        base = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return 0
    try:
        high = fcntl.fcntl(base, fcntl.F_DUPFD_CLOEXEC, n - 1)
    except OSError:
        return 0
    finally:
        os.close(base)
    os.close(high)
    return n


def tune_process_for_serving() -> None:
    """Settings the proxy serves with; call once, after ``ProxyRuntime.start``.

    ``edge-proxy serve`` calls it; so must a program that runs the proxy in-process and measures its
    latency (benchmarks/energy_validation.py), or it measures another process than the deployed one.

    - Start-up objects (modules, the app, metric registries) live as long as the process: they are
      moved out of the cyclic GC's reach (``gc.freeze``), so a full (generation 2) collection scans
      only what was created later. Over a whole start-up heap one full collection stalled the event
      loop 20-30 ms (docs/benchmarks.md, Proxy overhead); with full sample rings (4096 readings) a
      full collection is ~1 ms.
    - The energy sampler thread splits each tick's energy over the requests in flight (~1 ms of
      Python with 100 requests). With the default 5 ms switch interval the event loop, woken by I/O
      meanwhile, may wait that long for the GIL; 0.5 ms bounds that wait (a switch costs
      microseconds, and only happens while both threads want to run).

    Call :func:`reserve_fd_table` separately, before the process starts any thread (it is free
    then, and a grace period later).
    """
    gc.collect()
    gc.freeze()
    sys.setswitchinterval(SWITCH_INTERVAL_SECONDS)
