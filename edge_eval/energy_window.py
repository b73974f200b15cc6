"""Measured energy of one phase of work (training, merge, quantize): the energy sources of
``edge_proxy.energy`` read at the start and the end of the phase (cumulative counters, so the
difference is the phase's energy).

Source ``nvml`` (the GPUs' energy counters) when a CUDA device is used and NVML initialises;
otherwise ``estimated`` (busy CPU seconds x declared watts per busy core, never presented as a
measurement).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from edge_proxy.energy.estimated_source import EstimatedReader
from edge_proxy.energy.readings import ReaderError, counter_delta_joules


@dataclass
class PhaseEnergy:
    joules: float
    seconds: float
    source: str                      # nvml | estimated


def make_reader(device: str, estimated_watts: float) -> Any:
    if device == "cuda":
        try:
            from edge_proxy.energy.nvml_source import NvmlReader
            return NvmlReader(None)
        except (ReaderError, Exception):              # noqa: BLE001 - no NVML: estimated
            pass
    return EstimatedReader(estimated_watts)


class EnergyWindow:
    """``with EnergyWindow(reader) as w: ...`` then ``w.result``: joules over the block."""

    def __init__(self, reader: Any) -> None:
        self.reader = reader
        self.result: PhaseEnergy | None = None

    def _read(self) -> dict[str, int]:
        readings = self.reader.read()
        return dict(readings[-1].energy_mj) if readings else {}

    def __enter__(self) -> "EnergyWindow":
        self._t0 = time.monotonic()
        self._e0 = self._read()
        return self

    def __exit__(self, *exc: Any) -> None:
        e1 = self._read()
        joules = 0.0
        for gpu, v0 in self._e0.items():
            if gpu in e1:
                joules += counter_delta_joules(v0, e1[gpu])[0]
        self.result = PhaseEnergy(joules, time.monotonic() - self._t0, self.reader.source)
