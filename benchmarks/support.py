"""Benchmark support: the helpers every benchmark script needs, defined once.

Owns: free ports on 127.0.0.1, the one percentile definition the benchmarks report, waiting for a
process's HTTP endpoint (and a model server's engine to be warm), stopping the processes a benchmark
started, /proc CPU accounting of a process tree, and the stamp a result file carries (UTC date,
command line, commit).

Must NOT: measure anything itself, print, import the proxy or the model server (benchmarks run as
scripts, ``python benchmarks/X.py``: this module is found because the script's folder is on sys.path),
or talk to anything but 127.0.0.1.
"""
from __future__ import annotations

import asyncio
import math
import os
import signal as signal_module
import shlex
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterable, Sequence

ROOT = Path(__file__).resolve().parents[1]
T0 = time.monotonic()     # when the benchmark started (this module is imported first): log lines' clock


def log(msg: str) -> None:
    """One progress line on stdout, stamped with the seconds since the benchmark started."""
    print(f"[{time.monotonic() - T0:7.1f}s] {msg}", flush=True)


class NotReady(RuntimeError):
    """A started process exited, or its endpoint did not answer in time."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def percentile(xs: Sequence[float], q: float, empty: float | None = None) -> float | None:
    """The q-quantile (0 <= q <= 1) of ``xs`` by nearest rank: with the n values sorted, the value at
    index round(q (n - 1)) (Python's round: a tie goes to the even index). Same unit as ``xs``; no
    interpolation, so it is always a measured value. ``empty`` (None, or e.g. ``math.nan``) when
    ``xs`` is empty. The one percentile every benchmark reports (and scripts/readme_table.py
    recomputes from raw results)."""
    if not xs:
        return empty
    v = sorted(xs)
    return v[min(len(v) - 1, max(0, int(round(q * (len(v) - 1)))))]


def pct(xs: Sequence[float], q: float) -> float:
    """:func:`percentile` with NaN for no samples (tables print ``nan``, JSON keeps a float)."""
    out = percentile(xs, q, math.nan)
    assert out is not None
    return out


def wait_http_ok(url: str, timeout: float = 30.0, proc: subprocess.Popen | None = None,
                 name: str | None = None, interval: float = 0.05) -> None:
    """Poll ``url`` until it answers 2xx; raise :class:`NotReady` when ``proc`` exits first or after
    ``timeout`` seconds (monotonic clock). ``name`` names the process in the message."""
    who = name or (str(proc.args[0]) if proc is not None and isinstance(proc.args, (list, tuple)) else "process")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise NotReady(f"{who} exited with status {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:   # noqa: S310 - 127.0.0.1 only
                r.read()
                return
        except OSError:
            time.sleep(interval)
    raise NotReady(f"{who} not ready after {timeout:.0f} s ({url})")


def wait_engine_warm(base_url: str, timeout: float) -> dict:
    """After /health: poll the model server's /info until ``engine_warm`` is not False (``serve`` warms the
    fast engine up in the background after it is ready: the first requests run eagerly), or ``timeout``
    seconds pass; return the last /info."""
    import json

    deadline = time.monotonic() + timeout
    while True:
        with urllib.request.urlopen(base_url + "/info", timeout=5) as r:   # noqa: S310 - 127.0.0.1 only
            info = json.load(r)
        if info.get("engine_warm") is not False or time.monotonic() > deadline:
            return info
        time.sleep(0.25)


def stop_process(proc: subprocess.Popen | None, timeout: float = 10.0) -> int | None:
    """SIGTERM ``proc`` if it runs, wait ``timeout`` seconds, then SIGKILL; its exit status."""
    if proc is None:
        return None
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    return proc.returncode


def stop_all(procs: Iterable[subprocess.Popen], timeout: float = 10.0) -> None:
    """SIGTERM every process still running, then wait for each (SIGKILL after ``timeout`` s).

    A process that leads its own process group (``start_new_session=True``, e.g. a ``shell=True``
    target whose shell forks the real server) is signalled as a group, so no child outlives it."""
    procs = list(procs)

    def signal(p: subprocess.Popen, sig: int) -> None:
        try:
            if os.getpgid(p.pid) == p.pid:
                os.killpg(p.pid, sig)
                return
        except ProcessLookupError:
            return
        p.send_signal(sig)

    for p in procs:
        if p.poll() is None:
            signal(p, signal_module.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            signal(p, signal_module.SIGKILL)


def cpu_seconds(pids: Iterable[int]) -> float:
    """User + system CPU seconds of these processes so far (/proc/PID/stat; gone ones count 0)."""
    tck = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tck
        except (OSError, IndexError, ValueError):
            pass
    return total


def child_pids(pid: int) -> list[int]:
    """``pid`` and its direct children (/proc/PID/task/*/children)."""
    out = [pid]
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            kids = Path(f"/proc/{pid}/task/{tid}/children").read_text().split()
            out += [int(k) for k in kids]
    except OSError:
        pass
    return out


def use_uvloop() -> str:
    """Make new event loops uvloop's when it is installed (same for every target of a load
    generator); returns the loop's name, ``uvloop`` or ``asyncio``."""
    try:
        import uvloop  # type: ignore[import-not-found]
    except ImportError:
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


# ---- the stamp on a result file -----------------------------------------------------------------------
def utc_date(fmt: str = "%Y-%m-%d %H:%M UTC") -> str:
    """Now, UTC, in ``fmt`` (each benchmark keeps the format its result files always had)."""
    return time.strftime(fmt, time.gmtime())


def default_commit() -> str:
    """The commit a result is stamped with: $EDGE_EVAL_COMMIT (set by the runner that checked the
    tree out), else "unknown"."""
    return os.environ.get("EDGE_EVAL_COMMIT", "unknown")


def command_line(script: str, argv: Sequence[str] | None = None, quote: bool = False) -> str:
    """``python benchmarks/X.py ARGS``-style command for a result file (``argv``: default sys.argv[1:])."""
    args = list(sys.argv[1:] if argv is None else argv)
    return " ".join([script, *((shlex.quote(a) for a in args) if quote else args)])


def machine() -> str:
    """Host name, CPU count and model, e.g. ``edge-vm (2 CPUs, Intel(R) Xeon(R) Processor)``: CPU figures depend on the
    machine, so reports say which one ran them."""
    import platform

    model = "CPU model unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{platform.node()} ({os.cpu_count()} CPUs, {model})"


def _pin_threads(pid: int, mask: set[int]) -> None:
    """Every thread of ``pid`` onto the CPUs in ``mask``."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        os.sched_setaffinity(int(tid), mask)


def pin_targets_apart(target_pids: Iterable[int], other_pids: Iterable[int]) -> str | None:
    """Every thread of the targets' processes and of their direct children (nginx's workers) on the first CPU this
    process may use, the other processes' (and this process's) on the rest. Returns an error line, or None."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return "--pin needs at least 2 CPUs"
    _pin_threads(os.getpid(), set(cpus[1:]))            # this process only: its children are the targets
    for pid in other_pids:
        for p in child_pids(pid):
            _pin_threads(p, set(cpus[1:]))
    for pid in target_pids:
        for p in child_pids(pid):
            _pin_threads(p, {cpus[0]})
    return None


def pin_proxies(procs: Iterable[subprocess.Popen], targets: list[list[int]]) -> str | None:
    """Pin every thread of each target's proxies (pids) to their own CPUs, everything else (``procs``
    not in a target, and this process) to the rest: the k-th proxy of a target gets CPU k when there
    are at least two CPUs left for the rest, else CPU 0. Returns an error line, or None."""
    import os
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return "--pin needs at least 2 CPUs"
    width = max((len(t) for t in targets), default=1)
    own = width if len(cpus) >= width + 2 else 1
    where = {pid: {cpus[k % own]} for t in targets for k, pid in enumerate(t)}
    rest = set(cpus[own:])
    for p in procs:
        _pin_threads(p.pid, where.get(p.pid, rest))
    _pin_threads(os.getpid(), rest)
    return None
