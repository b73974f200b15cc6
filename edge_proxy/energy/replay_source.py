"""Replay source: a recorded trace of energy-counter readings (JSON lines).

Trace format (what ``edge-proxy record`` writes)::

    {"kind": "header", "source": "nvml", "gpus": [{"uuid": "GPU-..", "name": ".."}], "period_seconds": 0.1, ...}
    {"t": 0.0,   "energy_millijoules": {"GPU-..": 123456789}, "power_watts": {"GPU-..": 74.9}}
    {"t": 0.1,   "energy_millijoules": {"GPU-..": 123464512}, "power_watts": {"GPU-..": 75.3}}
    {"t": 0.2,   "error": "NVMLError_Unknown"}                 # a failed read
    {"t": 0.3,   "energy_millijoules": {...}, "at_rest": false}  # optional: GPU busy / at rest
    ...

``at_rest`` (optional, written by ``edge-proxy record`` from NVML utilization): true when every GPU
was at rest (utilization 0), false when one was busy. Traces without it replay as "cannot tell"
(the ledger then learns idle power from ticks with nothing in flight, as before).

``t`` is seconds on the recorder's monotonic clock (any origin). The header line is optional. A path ending in
``.gz`` is read through gzip (the traces committed under ``benchmarks/results/`` are compressed).
Counter resets (a value lower than the previous one) and gaps (missing time) are replayed as
recorded: the sampler clamps and records them.

Two modes:
- ``realtime``: readings come out when their time has come, relative to when the reader started
  (``loop=True`` starts over at the end; the counter then goes back, which the sampler sees as a reset).
- ``driven``: every :meth:`read` returns the next reading at once, stamped ``origin_ns + t``, so tests
  run a trace as fast as they like on a virtual clock.
"""
from __future__ import annotations

import gzip
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from edge_proxy.energy.readings import Reading, ReaderError


@dataclass(frozen=True)
class TraceRecord:
    t_seconds: float
    energy_mj: dict[str, int]
    power_w: dict[str, float]
    error: str | None = None
    at_rest: bool | None = None


def load_trace(path: str | Path) -> tuple[dict[str, Any], list[TraceRecord]]:
    """Parse a trace file into (header, records); raise ReaderError with the line number on bad input."""
    p = Path(path)
    try:
        text = gzip.decompress(p.read_bytes()).decode() if p.suffix == ".gz" else p.read_text()
    except (OSError, EOFError, UnicodeDecodeError) as exc:
        raise ReaderError(f"cannot read replay trace {p}: {getattr(exc, 'strerror', None) or exc}") from None
    header: dict[str, Any] = {}
    records: list[TraceRecord] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            obj = json.loads(line)
            if not isinstance(obj, dict):
                raise ValueError("not an object")
            if obj.get("kind") == "header":
                header = obj
                continue
            t = float(obj["t"])
            if obj.get("error") is not None:
                records.append(TraceRecord(t, {}, {}, str(obj["error"])))
                continue
            energy = {str(k): int(v) for k, v in obj["energy_millijoules"].items()}
            power = {str(k): float(v) for k, v in (obj.get("power_watts") or {}).items()}
            at_rest = obj.get("at_rest")
            if at_rest is not None and not isinstance(at_rest, bool):
                raise ValueError("at_rest must be true or false")
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ReaderError(f"replay trace {p} line {lineno}: invalid record ({exc})") from None
        if records and t < records[-1].t_seconds:
            raise ReaderError(f"replay trace {p} line {lineno}: time goes backwards")
        records.append(TraceRecord(t, energy, power, None, at_rest))
    if len([r for r in records if r.error is None]) < 2:
        raise ReaderError(f"replay trace {p}: needs at least two counter readings")
    return header, records


class ReplayReader:
    """Replays a trace; see the module docstring for the two modes."""

    source = "replay"

    def __init__(self, path: str | Path, mode: str = "realtime", loop: bool = True,
                 gpu_uuids: list[str] | None = None, origin_ns: int | None = None,
                 clock: Callable[[], int] = time.monotonic_ns) -> None:
        if mode not in ("realtime", "driven"):
            raise ReaderError(f"replay mode must be realtime or driven, got {mode!r}")
        self.header, records = load_trace(path)
        seen: list[str] = []
        for r in records:
            for u in r.energy_mj:
                if u not in seen:
                    seen.append(u)
        if gpu_uuids:
            missing = [u for u in gpu_uuids if u not in seen]
            if missing:
                raise ReaderError(f"GPU UUID(s) not in replay trace: {', '.join(missing)}")
            keep = set(gpu_uuids)
            records = [TraceRecord(r.t_seconds, {u: v for u, v in r.energy_mj.items() if u in keep},
                                   {u: v for u, v in r.power_w.items() if u in keep}, r.error, r.at_rest)
                       for r in records]
            seen = list(gpu_uuids)
        self.gpu_uuids = seen
        self.records = records
        self.mode = mode
        self.loop = loop
        self._clock = clock
        self._t_first = records[0].t_seconds
        span = records[-1].t_seconds - self._t_first
        steps = [b.t_seconds - a.t_seconds for a, b in zip(records, records[1:]) if b.t_seconds > a.t_seconds]
        self.period_seconds = float(self.header.get("period_seconds") or (sorted(steps)[len(steps) // 2] if steps else 0.1))
        self._loop_span_ns = int(round((span + self.period_seconds) * 1e9))
        self._origin_ns = clock() if origin_ns is None else origin_ns
        self._index = 0
        self._loops = 0
        self.exhausted = False

    def _stamp(self, rec: TraceRecord) -> int:
        return self._origin_ns + self._loops * self._loop_span_ns + int(round((rec.t_seconds - self._t_first) * 1e9))

    def _emit(self, rec: TraceRecord) -> Reading:
        return Reading(t_ns=self._stamp(rec), energy_mj=dict(rec.energy_mj), power_w=dict(rec.power_w),
                       error=rec.error, at_rest=rec.at_rest)

    def _advance(self) -> TraceRecord | None:
        if self._index >= len(self.records):
            if not self.loop:
                self.exhausted = True
                return None
            self._index = 0
            self._loops += 1
        rec = self.records[self._index]
        self._index += 1
        return rec

    def read(self) -> list[Reading]:
        if self.mode == "driven":
            rec = self._advance()
            return [] if rec is None else [self._emit(rec)]
        now = self._clock()
        out: list[Reading] = []
        while len(out) < 10_000:
            if self._index >= len(self.records) and not self.loop:
                self.exhausted = True
                break
            idx = self._index if self._index < len(self.records) else 0
            loops = self._loops if self._index < len(self.records) else self._loops + 1
            rec = self.records[idx]
            due = self._origin_ns + loops * self._loop_span_ns + int(round((rec.t_seconds - self._t_first) * 1e9))
            if due > now:
                break
            rec = self._advance()
            assert rec is not None
            out.append(self._emit(rec))
        return out

    def close(self) -> None:
        return None
