"""LoopWatch: a diagnostic for requests that reach an asyncio handler late (event-loop stalls, GC
pauses, stack samples while stalled, per-thread CPU and run-queue wait from /proc schedstat).
Used by energy_validation.py's check 3.

Owns: that diagnostic. Must NOT: change what it watches (it only samples), or print.
"""
from __future__ import annotations

import asyncio
import os
import sys
import time
from typing import Any


def thread_sched(pid: int | str) -> dict[str, tuple[str, int, int]]:
    """Per-thread scheduler times of a process (Linux /proc/PID/task/TID/schedstat): tid ->
    (name, ns on a CPU, ns runnable but waiting for a CPU). Empty where unavailable."""
    out: dict[str, tuple[str, int, int]] = {}
    base = f"/proc/{pid}/task"
    try:
        tids = os.listdir(base)
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"{base}/{tid}/schedstat") as f:
                run_ns, wait_ns = (int(x) for x in f.read().split()[:2])
            with open(f"{base}/{tid}/comm") as f:
                name = f.read().strip()
        except (OSError, ValueError):
            continue
        out[tid] = (name, run_ns, wait_ns)
    return out


def sched_delta(a: dict[str, tuple[str, int, int]], b: dict[str, tuple[str, int, int]],
                top: int = 8) -> dict[str, Any]:
    """CPU (run) and run-queue wait (ms) per thread between two :func:`thread_sched` snapshots."""
    rows = []
    for tid, (name, run1, wait1) in b.items():
        _, run0, wait0 = a.get(tid, (name, 0, 0))
        rows.append((name, tid, (run1 - run0) / 1e6, (wait1 - wait0) / 1e6))
    rows.sort(key=lambda r: -r[2])
    return {"threads": len(rows), "threads_over_1ms_cpu": sum(1 for r in rows if r[2] > 1.0),
            "cpu_ms": round(sum(r[2] for r in rows), 3), "runqueue_wait_ms": round(sum(r[3] for r in rows), 3),
            "top": [{"name": n, "tid": t, "cpu_ms": round(c, 3), "runqueue_wait_ms": round(w, 3)}
                    for n, t, c, w in rows[:top]]}


class LoopWatch:
    """A diagnostic for requests that reach the proxy's handler late. While active it records:

    - how late the event loop wakes a 1 ms sleeper (stalls over 2 ms);
    - every cyclic-GC collection (generation, pause);
    - from a watchdog thread, stack samples of every thread of this process while the loop has not
      turned for over 3 ms (where the loop thread is stuck, and what the others do meanwhile);
    - per-thread CPU and run-queue wait (/proc schedstat) of this process and of ``other_pid`` (the
      model server) over the window: whether the loop thread waited for a CPU.
    """

    def __init__(self, other_pid: int | None = None) -> None:
        self.stalls_ms: list[tuple[float, float]] = []     # (at ms from start, stall ms)
        self.gc: list[tuple[int, float, float]] = []       # (generation, at ms, pause ms)
        self.stacks: dict[str, int] = {}                   # "thread: innermost <- ..." -> samples
        self.other_pid = other_pid
        self._t0 = 0
        self._gc_start = 0
        self._beat_ns = 0
        self._task: asyncio.Task[None] | None = None
        self._thread: Any = None
        self._stop = False
        self._sched0: tuple[dict[str, Any], dict[str, Any]] = ({}, {})
        self._sched1: tuple[dict[str, Any], dict[str, Any]] = ({}, {})

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        now = time.monotonic_ns()
        if phase == "start":
            self._gc_start = now
        elif self._gc_start:
            self.gc.append((int(info.get("generation", -1)), (self._gc_start - self._t0) / 1e6,
                            (now - self._gc_start) / 1e6))

    async def _watch(self) -> None:
        while True:
            a = time.monotonic_ns()
            self._beat_ns = a
            await asyncio.sleep(0.001)
            self._beat_ns = time.monotonic_ns()
            late = (self._beat_ns - a) / 1e6 - 1.0
            if late > 2.0:
                self.stalls_ms.append((round((a - self._t0) / 1e6, 3), round(late, 3)))

    def _sample(self) -> None:
        import threading
        import traceback
        names = {t.ident: t.name for t in threading.enumerate()}
        me = threading.get_ident()
        while not self._stop:
            time.sleep(0.0005)
            if (time.monotonic_ns() - self._beat_ns) / 1e6 < 4.0:
                continue
            for ident, frame in sys._current_frames().items():
                if ident == me:
                    continue
                st = " <- ".join(f"{os.path.basename(f.filename)}:{f.lineno}:{f.name}"
                                 for f in reversed(traceback.extract_stack(frame, limit=6)))
                key = f"{names.get(ident, ident)}: {st}"
                self.stacks[key] = self.stacks.get(key, 0) + 1

    async def __aenter__(self) -> "LoopWatch":
        import gc
        import threading
        self._sched0 = (thread_sched("self"), thread_sched(self.other_pid) if self.other_pid else {})
        self._t0 = self._beat_ns = time.monotonic_ns()
        gc.callbacks.append(self._on_gc)
        self._task = asyncio.create_task(self._watch())
        self._thread = threading.Thread(target=self._sample, name="loopwatch", daemon=True)
        self._thread.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        import gc
        self._sched1 = (thread_sched("self"), thread_sched(self.other_pid) if self.other_pid else {})
        gc.callbacks.remove(self._on_gc)
        self._stop = True
        if self._task is not None:
            self._task.cancel()
        if self._thread is not None:
            self._thread.join(1.0)

    def summary(self) -> dict[str, Any]:
        top = sorted(self.stacks.items(), key=lambda kv: -kv[1])[:12]
        return {"stalls_over_2ms": self.stalls_ms[:20],
                "max_stall_ms": max((x for _, x in self.stalls_ms), default=0.0),
                "gc_collections": len(self.gc),
                "gc_max_pause_ms": round(max((p for _, _, p in self.gc), default=0.0), 3),
                "gc_gen2": [(round(t, 3), round(p, 3)) for g, t, p in self.gc if g == 2],
                "stack_samples_while_stalled": [{"samples": n, "stack": k} for k, n in top],
                "this_process_threads": sched_delta(self._sched0[0], self._sched1[0]),
                "model_server_threads": sched_delta(self._sched0[1], self._sched1[1]) if self.other_pid else None}
