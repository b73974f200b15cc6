"""Measured energy of one phase of work (training, merge, quantize): the energy sources of
``edge_proxy.energy`` read at the start and the end of the phase (cumulative counters, so the
difference is the phase's energy), as the one window type of the project,
:class:`edge_proxy.energy.window.Measurement`. A phase (minutes of training) outlasts the
sampler's tick ring, so the counters are read directly at the two ends instead of through
:class:`~edge_proxy.energy.window.EnergyWindows`; a counter that went backwards (reset) or a GPU
that disappeared marks the measurement as a gap.

Source ``nvml`` (the GPUs' energy counters) when a CUDA device is used and NVML initialises;
otherwise ``estimated`` (busy CPU seconds x declared watts per busy core, never presented as a
measurement).
"""
from __future__ import annotations

import time
from typing import Any

from edge_proxy.energy.estimated_source import EstimatedReader
from edge_proxy.energy.readings import ReaderError, counter_delta_joules
from edge_proxy.energy.window import Measurement, source_kind


def make_reader(device: str, estimated_watts: float) -> Any:
    if device == "cuda":
        try:
            from edge_proxy.energy.nvml_source import NvmlReader
            return NvmlReader(None)
        except (ReaderError, Exception):              # noqa: BLE001 - no NVML: estimated
            pass
    return EstimatedReader(estimated_watts)


class EnergyWindow:
    """``with EnergyWindow(reader, name) as w: ...`` then ``w.result``: the block's
    :class:`~edge_proxy.energy.window.Measurement`."""

    def __init__(self, reader: Any, name: str = "") -> None:
        self.reader = reader
        self.name = name
        self.result: Measurement | None = None

    def _read(self) -> dict[str, int]:
        readings = self.reader.read()
        return dict(readings[-1].energy_mj) if readings else {}

    def __enter__(self) -> "EnergyWindow":
        self._t0 = time.monotonic_ns()
        self._e0 = self._read()
        return self

    def __exit__(self, *exc: Any) -> None:
        e1 = self._read()
        t1 = time.monotonic_ns()
        by_device: dict[str, float] = {}
        gap = set(self._e0) != set(e1)
        for dev, v0 in self._e0.items():
            if dev in e1:
                joules, reset = counter_delta_joules(v0, e1[dev])
                by_device[dev] = joules
                gap = gap or bool(reset)
        source = self.reader.source
        self.result = Measurement(self.name, self._t0, t1, sum(by_device.values()), by_device,
                                  source=source, kind=source_kind(source), gap=gap,
                                  coverage=1.0 if by_device else 0.0)
