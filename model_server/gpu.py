"""GPU identity and energy counters for the model server (NVML through nvidia-ml-py, imported lazily).

CUDA device indices are not NVML indices (CUDA_VISIBLE_DEVICES, PCI ordering): devices are matched by
UUID. Every function degrades to ``None``/empty when NVML or a GPU is missing.
"""
from __future__ import annotations

import ctypes
import logging
import os
import platform
import threading
from typing import Any

log = logging.getLogger("model_server.gpu")


def _nvml():
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml
    except Exception:  # no library, no driver, no GPU
        return None


def normalize_uuid(raw: Any) -> str | None:
    """torch reports ``uuid`` without NVML's ``GPU-`` prefix; NVML wants it."""
    if raw is None:
        return None
    text = str(raw).strip()
    if not text:
        return None
    return text if text.startswith(("GPU-", "MIG-")) else f"GPU-{text}"


def _nvml_uuid_for(props, nvml) -> str | None:
    """NVML's UUID for a torch CUDA device: torch's uuid if NVML knows it, else a PCI bus match."""
    candidate = normalize_uuid(getattr(props, "uuid", None))
    if nvml is None:
        return candidate
    if candidate:
        try:
            nvml.nvmlDeviceGetHandleByUUID(candidate)
            return candidate
        except Exception:
            pass
    try:
        want = (int(props.pci_domain_id), int(props.pci_bus_id), int(props.pci_device_id))
        for i in range(nvml.nvmlDeviceGetCount()):
            h = nvml.nvmlDeviceGetHandleByIndex(i)
            pci = nvml.nvmlDeviceGetPciInfo(h)
            if (int(pci.domain), int(pci.bus), int(pci.device)) == want:
                raw = nvml.nvmlDeviceGetUUID(h)
                return raw.decode() if isinstance(raw, bytes) else str(raw)
    except Exception:
        pass
    return candidate


def describe_devices(device_type: str, indices: list[int] | None = None) -> list[dict[str, Any]]:
    """``[{type, index, name, uuid}]`` for the devices a model lives on (UUIDs as NVML spells them)."""
    if device_type != "cuda":
        name = platform.processor() or platform.machine() or "cpu"
        return [{"type": "cpu", "index": 0, "name": name, "uuid": None}]
    import torch

    nvml = _nvml()
    out = []
    for i in indices if indices is not None else range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        out.append({"type": "cuda", "index": i, "name": props.name, "uuid": _nvml_uuid_for(props, nvml)})
    return out


def energy_millijoules(uuids: list[str]) -> dict[str, int] | None:
    """Cumulative energy counter (mJ since driver load) per GPU UUID, or None without NVML."""
    if not uuids:
        return None
    nvml = _nvml()
    if nvml is None:
        return None
    out: dict[str, int] = {}
    try:
        for uuid in uuids:
            handle = nvml.nvmlDeviceGetHandleByUUID(uuid)
            out[uuid] = int(nvml.nvmlDeviceGetTotalEnergyConsumption(handle))
    except Exception as exc:  # unsupported counter (pre-Volta), MIG, driver error
        log.warning("NVML energy counter unavailable: %s", exc)
        return None
    return out


def energy_delta_joules(before: dict[str, int] | None, after: dict[str, int] | None) -> float | None:
    """Sum over GPUs of (after - before) in joules; None when either read failed.

    A counter that went backwards (driver reload) contributes 0 rather than a negative value.
    """
    if not before or not after:
        return None
    total_mj = 0
    for uuid, start in before.items():
        end = after.get(uuid)
        if end is None:
            return None
        total_mj += max(0, end - start)
    return total_mj / 1000.0


def visible_gpu_uuids() -> list[str]:
    """UUIDs of the GPUs this process may use, from NVML alone (no torch import, so it is fast).

    Honors ``CUDA_VISIBLE_DEVICES`` given as UUIDs (prefix match) or as indices (taken as NVML
    indices: right with ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` and on single-GPU hosts).
    """
    nvml = _nvml()
    if nvml is None:
        return []
    try:
        all_uuids = []
        for i in range(nvml.nvmlDeviceGetCount()):
            raw = nvml.nvmlDeviceGetUUID(nvml.nvmlDeviceGetHandleByIndex(i))
            all_uuids.append(raw.decode() if isinstance(raw, bytes) else str(raw))
    except Exception as exc:
        log.warning("NVML device listing failed: %s", exc)
        return []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return all_uuids
    out: list[str] = []
    for entry in (e.strip() for e in visible.split(",")):
        if not entry:
            continue
        if entry.isdigit():
            idx = int(entry)
            if idx < len(all_uuids):
                out.append(all_uuids[idx])
            continue
        if entry.startswith("-"):
            break                       # CUDA stops at the first invalid entry
        match = [u for u in all_uuids if u.startswith(entry if entry.startswith(("GPU-", "MIG-")) else f"GPU-{entry}")]
        if len(match) == 1:
            out.append(match[0])
    return out


def start_driver_init() -> threading.Thread:
    """``cuInit(0)`` on a daemon thread through ctypes, which releases the GIL for the call: CUDA's driver
    initialises while the main thread imports torch, and torch's device check then finds it done (cuInit is
    thread-safe and idempotent). ``serve`` starts it with ``MODEL_SERVER_EARLY_CUDA_INIT=1`` (an experiment:
    ``cold_start_phases.py``'s ``seeded-earlycuda``; on an H100 it moved the 0.19 s init into the imports and no
    start was shorter, docs/benchmarks.md). A host without libcuda: the thread does nothing."""
    def run() -> None:
        try:
            rc = ctypes.CDLL("libcuda.so.1").cuInit(0)
            log.debug("early cuInit returned %s", rc)
        except (OSError, AttributeError) as exc:
            log.debug("early cuInit not run: %s", exc)

    thread = threading.Thread(target=run, name="cuda-driver-init", daemon=True)
    thread.start()
    return thread
