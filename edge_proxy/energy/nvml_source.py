"""NVML source: cumulative energy counters of local GPUs, chosen by UUID.

Reads ``nvmlDeviceGetTotalEnergyConsumption`` (mJ since driver load; about 4 ms per call on an
H100, so only ever from the sampler thread) and instantaneous power from the
``NVML_FI_DEV_POWER_INSTANT`` field (mW), falling back to ``nvmlDeviceGetPowerUsage`` (a 1-s
average on Ampere and newer). GPUs are addressed by UUID: CUDA indices are not NVML indices.
Each reading also says whether the GPUs were at rest: ``nvmlDeviceGetUtilizationRates().gpu`` is 0
on every GPU (no kernel ran during the driver's last sample period), which the ledger uses to
learn idle power and to tell foreign work (busy GPU, none of the proxy's requests in flight).
A loaded model server with nothing to do is at rest too: a resident compute process alone is not
work, so running processes are not part of the test.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Any

from edge_proxy.energy.readings import Reading, ReaderError

log = logging.getLogger(__name__)

_init_lock = threading.Lock()
_init_count = 0   # nvmlInit/nvmlShutdown are reference counted by the library too; we mirror it


def _pynvml() -> Any:
    try:
        import pynvml
    except ImportError as exc:  # pragma: no cover - nvidia-ml-py is a hard dependency
        raise ReaderError(f"nvidia-ml-py is not installed: {exc}") from None
    return pynvml


def nvml_init() -> Any:
    """Initialise NVML; raise ReaderError (one line) when there is no driver or GPU."""
    global _init_count
    pynvml = _pynvml()
    with _init_lock:
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            raise ReaderError(f"NVML unavailable: {exc}") from None
        _init_count += 1
    return pynvml


def nvml_shutdown() -> None:
    global _init_count
    pynvml = _pynvml()
    with _init_lock:
        if _init_count > 0:
            _init_count -= 1
            try:
                pynvml.nvmlShutdown()
            except pynvml.NVMLError:
                pass


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class NvmlReader:
    """Reads every selected GPU's energy counter and instant power in one call of :meth:`read`."""

    source = "nvml"

    def __init__(self, gpu_uuids: list[str] | None = None, read_power: bool = True) -> None:
        self._nvml = nvml_init()
        pynvml = self._nvml
        try:
            handles: dict[str, Any] = {}
            names: dict[str, str] = {}
            for i in range(pynvml.nvmlDeviceGetCount()):
                h = pynvml.nvmlDeviceGetHandleByIndex(i)
                uuid = _text(pynvml.nvmlDeviceGetUUID(h))
                handles[uuid] = h
                names[uuid] = _text(pynvml.nvmlDeviceGetName(h))
            if gpu_uuids:
                missing = [u for u in gpu_uuids if u not in handles]
                if missing:
                    raise ReaderError(f"GPU UUID(s) not found by NVML: {', '.join(missing)} "
                                      f"(found: {', '.join(handles) or 'none'})")
                handles = {u: handles[u] for u in gpu_uuids}
            if not handles:
                raise ReaderError("NVML found no GPU")
            for uuid, h in handles.items():   # fails early on pre-Volta GPUs / vGPUs without it
                try:
                    pynvml.nvmlDeviceGetTotalEnergyConsumption(h)
                except pynvml.NVMLError as exc:
                    raise ReaderError(f"GPU {uuid}: energy counter unsupported: {exc}") from None
        except BaseException:
            nvml_shutdown()
            raise
        self._handles = handles
        self.gpu_names = {u: names[u] for u in handles}
        self.gpu_uuids = list(handles)
        self._read_power = read_power
        self._power_field_ok = True
        self._util_ok = True
        self._closed = False

    def _power_watts(self, h: Any) -> float | None:
        pynvml = self._nvml
        if self._power_field_ok:
            try:
                (fv,) = pynvml.nvmlDeviceGetFieldValues(h, [pynvml.NVML_FI_DEV_POWER_INSTANT])
                if fv.nvmlReturn == pynvml.NVML_SUCCESS:
                    return fv.value.uiVal / 1000.0
            except (pynvml.NVMLError, AttributeError, ValueError):
                pass
            self._power_field_ok = False
        try:
            return pynvml.nvmlDeviceGetPowerUsage(h) / 1000.0
        except pynvml.NVMLError:
            return None

    def _at_rest(self) -> bool | None:
        """True when every GPU's utilization is 0, False when one is busy, None when unsupported."""
        if not self._util_ok:
            return None
        pynvml = self._nvml
        try:
            return all(pynvml.nvmlDeviceGetUtilizationRates(h).gpu == 0 for h in self._handles.values())
        except (pynvml.NVMLError, AttributeError):
            self._util_ok = False          # e.g. vGPU / MIG without utilization: cannot tell
            return None

    def read(self) -> list[Reading]:
        pynvml = self._nvml
        energy: dict[str, int] = {}
        power: dict[str, float] = {}
        errors: list[str] = []
        t_before = time.monotonic_ns()
        for uuid, h in self._handles.items():
            try:
                energy[uuid] = int(pynvml.nvmlDeviceGetTotalEnergyConsumption(h))
            except pynvml.NVMLError as exc:
                errors.append(f"{uuid}: {exc}")
        t_after = time.monotonic_ns()
        if self._read_power:
            for uuid, h in self._handles.items():
                p = self._power_watts(h)
                if p is not None:
                    power[uuid] = p
        t_ns = (t_before + t_after) // 2
        if not energy:
            return [Reading(t_ns=t_ns, error="; ".join(errors) or "no GPU read")]
        return [Reading(t_ns=t_ns, energy_mj=energy, power_w=power, at_rest=self._at_rest())]

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            nvml_shutdown()
