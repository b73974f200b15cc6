"""The sampler: one background thread that polls an energy source and turns readings into ticks.

- Default period 100 ms (the NVML counter updates about every 100 ms; one read costs ~4 ms on an
  H100, so it is never read on the event loop).
- Readings and ticks go into bounded rings (``collections.deque(maxlen=ring_size)``).
- A read that sees no counter change (it landed before the counter's next ~100 ms update) closes
  no tick; the next read that sees an update closes one tick over the whole time.
- A counter that goes down (reset / driver reload / wrap) is clamped to 0 J and the tick is marked
  as a gap. A failed read is logged once (per distinct message), counted, and the next tick is
  marked as a gap; the cumulative counter makes the next good read cover the missed interval.
- Listeners (the ledger) receive each tick on the sampler thread; a failing listener is logged
  once and never stops sampling.

``step()`` runs one poll synchronously: tests drive a ``driven`` replay through it without a thread.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import deque
from typing import Callable

from edge_proxy.energy.readings import EnergyReader, Reading, Tick, combine_at_rest, counter_delta_joules

log = logging.getLogger(__name__)

TickListener = Callable[[Tick], None]


class Sampler:
    def __init__(self, reader: EnergyReader, period_seconds: float = 0.1, ring_size: int = 4096) -> None:
        if not period_seconds > 0:
            raise ValueError(f"sampling period must be > 0, got {period_seconds}")
        self.reader = reader
        self.source = reader.source
        self.period_seconds = float(period_seconds)
        self.readings: deque[Reading] = deque(maxlen=max(2, ring_size))
        self.ticks: deque[Tick] = deque(maxlen=max(2, ring_size))
        self._listeners: list[TickListener] = []
        self._lock = threading.Lock()
        self._prev: dict[str, tuple[int, int]] = {}     # uuid -> (t_ns, counter_mj) of the last good read
        self._last_t_ns: int | None = None               # end of the last tick (all GPUs)
        self._pending_gap = False
        self._at_rest: bool | None = None                # over the reads since the last tick
        self._at_rest_seen = False
        self._share_ns = 0.0                              # shared source: sum of share * dt since the last tick
        self._read_t_ns: int | None = None               # time of the last good read (share intervals)
        self._logged: set[str] = set()
        self._failed_listeners: set[int] = set()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._wake: threading.Lock | None = None        # held while the thread runs; stop() releases it
        # totals and state for exporters (read under the lock)
        self.energy_joules_by_gpu: dict[str, float] = {u: 0.0 for u in reader.gpu_uuids}
        self.power_watts: dict[str, float] = {}
        self.errors_total = 0
        self.gaps_total = 0
        self.resets_total = 0
        self.lag_seconds = 0.0
        self.max_stale_periods = 5

    # -- listeners -------------------------------------------------------------------------
    def add_listener(self, fn: TickListener) -> None:
        self._listeners.append(fn)

    # -- ingest ----------------------------------------------------------------------------
    def _log_once(self, key: str, msg: str, *args: object) -> None:
        if key not in self._logged and len(self._logged) < 100:
            self._logged.add(key)
            log.warning(msg, *args)

    def _stale(self, reading: Reading) -> bool:
        """True when no counter changed since the last tick and that tick is recent.

        The NVML counter updates about every 100 ms, the sampler's own period: a read can land just
        before the next update and see the same value. Closing a 0 J tick there (and a double tick
        next) would split energy over the wrong requests, so such a read closes no tick; the next
        read that sees an update closes one tick over the whole time. After ``max_stale_periods``
        periods without any update the tick is closed anyway (a counter that stopped)."""
        if self._last_t_ns is None or not reading.energy_mj:
            return False
        for uuid, mj in reading.energy_mj.items():
            prev = self._prev.get(uuid)
            if prev is None or prev[1] != mj:
                return False
        return reading.t_ns - self._last_t_ns < self.max_stale_periods * self.period_seconds * 1e9

    def ingest(self, reading: Reading) -> Tick | None:
        """Turn one reading into a tick (None for the first reading or a failed one)."""
        with self._lock:
            if reading.error is not None:
                self.errors_total += 1
                self._pending_gap = True
                self._log_once("err:" + reading.error.split(":")[0],
                               "energy source %s: read failed (%s); gap recorded, sampling continues",
                               self.source, reading.error)
                return None
            self.readings.append(reading)
            if reading.at_rest is not None:
                self._at_rest = reading.at_rest if not self._at_rest_seen else \
                    combine_at_rest(self._at_rest, reading.at_rest)
                self._at_rest_seen = True
            for u, p in reading.power_w.items():
                self.power_watts[u] = p
            t = reading.t_ns
            if reading.share is not None and self._read_t_ns is not None and t > self._read_t_ns:
                self._share_ns += reading.share * (t - self._read_t_ns)
            if self._read_t_ns is None or t > self._read_t_ns:
                self._read_t_ns = t
            if self._last_t_ns is not None and t <= self._last_t_ns:
                return None     # duplicate or out-of-order stamp: nothing new
            if self._stale(reading):
                return None     # the counter has not updated since the last read: wait for news
            by_gpu: dict[str, float] = {}
            gap = self._pending_gap
            for uuid, mj in reading.energy_mj.items():
                prev = self._prev.get(uuid)
                self._prev[uuid] = (t, mj)
                if prev is None:
                    continue
                dj, reset = counter_delta_joules(prev[1], mj)
                if reset:
                    gap = True
                    self.resets_total += 1
                    self._log_once("reset:" + uuid, "energy counter of %s went down (%d -> %d mJ): "
                                   "reset or wrap, clamped to 0 J and recorded as a gap", uuid, prev[1], mj)
                by_gpu[uuid] = dj
                self.energy_joules_by_gpu[uuid] = self.energy_joules_by_gpu.get(uuid, 0.0) + dj
            if len(by_gpu) < len(self.reader.gpu_uuids):
                gap = gap or self._last_t_ns is not None
            t0 = self._last_t_ns
            self._last_t_ns = t
            if t0 is None:
                self._pending_gap = False
                return None
            self._pending_gap = False
            if gap:
                self.gaps_total += 1
            share = 1.0 if reading.share is None else min(1.0, self._share_ns / (t - t0))
            tick = Tick(t0_ns=t0, t1_ns=t, joules=sum(by_gpu.values()), joules_by_gpu=by_gpu, gap=gap,
                        at_rest=self._at_rest, share=share)
            self._at_rest, self._at_rest_seen = None, False
            self._share_ns = 0.0
            self.ticks.append(tick)
        for i, fn in enumerate(self._listeners):
            try:
                fn(tick)
            except Exception:  # noqa: BLE001 - energy must never take the proxy down
                if i not in self._failed_listeners:
                    self._failed_listeners.add(i)
                    log.exception("energy tick listener failed (logged once)")
        return tick

    def step(self) -> list[Tick]:
        """Poll the source once (synchronously) and ingest what it returned."""
        try:
            readings = self.reader.read()
        except Exception as exc:  # noqa: BLE001 - a source bug is a gap, not a crash
            readings = [Reading(t_ns=time.monotonic_ns(), error=f"{type(exc).__name__}: {exc}")]
        out = []
        for r in readings:
            tick = self.ingest(r)
            if tick is not None:
                out.append(tick)
        if readings:
            newest = readings[0].t_ns if len(readings) == 1 else max(r.t_ns for r in readings)
            with self._lock:
                self.lag_seconds = max(0.0, (time.monotonic_ns() - newest) / 1e9)
        return out

    # -- thread ----------------------------------------------------------------------------
    def _run(self, wake: threading.Lock) -> None:
        # waits on ``wake`` (held until stop() releases it): one C call per period, where
        # ``Event.wait`` runs threading.Condition's Python code and allocates a lock each time
        period_ns = int(self.period_seconds * 1e9)
        next_t = time.monotonic_ns()
        while not self._stop.is_set():
            self.step()
            next_t += period_ns
            now = time.monotonic_ns()
            if next_t < now:                      # fell behind: skip missed slots, keep the grid
                next_t += ((now - next_t) // period_ns + 1) * period_ns
            if wake.acquire(timeout=(next_t - now) / 1e9):
                break                             # released by stop()

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._wake = threading.Lock()
        self._wake.acquire()
        self._thread = threading.Thread(target=self._run, args=(self._wake,), name=f"energy-sampler-{self.source}",
                                        daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        wake, self._wake = self._wake, None
        if wake is not None:
            wake.release()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        try:
            self.reader.close()
        except Exception:  # noqa: BLE001
            pass

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- queries ---------------------------------------------------------------------------
    def snapshot(self) -> dict[str, object]:
        with self._lock:
            return {"energy_joules_by_gpu": dict(self.energy_joules_by_gpu),
                    "power_watts": dict(self.power_watts), "lag_seconds": self.lag_seconds,
                    "errors_total": self.errors_total, "gaps_total": self.gaps_total,
                    "resets_total": self.resets_total}

    def recent_readings(self, since_ns: int | None = None, limit: int = 600) -> list[Reading]:
        with self._lock:
            items = [r for r in self.readings if since_ns is None or r.t_ns > since_ns]
        return items[-limit:]

    def ticks_between(self, a_ns: int, b_ns: int) -> list[Tick]:
        with self._lock:
            return [t for t in self.ticks if t.t1_ns > a_ns and t.t0_ns < b_ns]

    def latest_counters(self) -> dict[str, int]:
        with self._lock:
            return {u: v for u, (_, v) in self._prev.items()}
