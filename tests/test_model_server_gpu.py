"""GPU helpers of the model server: UUID mapping and load-energy arithmetic (NVML faked: no GPU here)."""
from __future__ import annotations

import types

import pytest

from model_server import gpu


def test_energy_delta_sums_gpus_and_clamps_resets():
    assert gpu.energy_delta_joules({"GPU-a": 1_000, "GPU-b": 10_000}, {"GPU-a": 3_500, "GPU-b": 12_000}) == 4.5
    assert gpu.energy_delta_joules({"GPU-a": 9_000}, {"GPU-a": 1_000}) == 0.0     # counter went backwards
    assert gpu.energy_delta_joules(None, {"GPU-a": 1}) is None
    assert gpu.energy_delta_joules({"GPU-a": 1}, {"GPU-b": 2}) is None


def test_normalize_uuid():
    assert gpu.normalize_uuid("1234-abcd") == "GPU-1234-abcd"
    assert gpu.normalize_uuid("GPU-1234") == "GPU-1234"
    assert gpu.normalize_uuid("MIG-77") == "MIG-77"
    assert gpu.normalize_uuid(None) is None and gpu.normalize_uuid(" ") is None


def _fake_nvml(uuids):
    handles = {i: u for i, u in enumerate(uuids)}
    return types.SimpleNamespace(nvmlDeviceGetCount=lambda: len(uuids),
                                 nvmlDeviceGetHandleByIndex=lambda i: i,
                                 nvmlDeviceGetUUID=lambda h: handles[h].encode())


@pytest.mark.parametrize("visible,expected", [
    (None, ["GPU-aaa1", "GPU-bbb2", "GPU-ccc3"]),
    ("2,0", ["GPU-ccc3", "GPU-aaa1"]),
    ("GPU-bbb", ["GPU-bbb2"]),
    ("ccc3", ["GPU-ccc3"]),
    ("1,-1,2", ["GPU-bbb2"]),
    ("", []),
])
def test_visible_gpu_uuids_honors_cuda_visible_devices(monkeypatch, visible, expected):
    monkeypatch.setattr(gpu, "_nvml", lambda: _fake_nvml(["GPU-aaa1", "GPU-bbb2", "GPU-ccc3"]))
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    assert gpu.visible_gpu_uuids() == expected


def test_no_nvml_means_no_gpus_and_no_energy(monkeypatch):
    """The real pynvml whose init fails (no library, no driver: as in CI, and forced here so the
    test means the same on a GPU machine): the call path degrades, never raises."""
    import pynvml

    def no_library() -> None:
        raise pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)

    monkeypatch.setattr(pynvml, "nvmlInit", no_library)
    assert gpu._nvml() is None
    assert gpu.visible_gpu_uuids() == []
    assert gpu.energy_millijoules(["GPU-x"]) is None


def test_nvml_listing_failure_means_no_gpus(monkeypatch):
    def broken_count() -> int:
        raise RuntimeError("driver went away")

    nvml = _fake_nvml(["GPU-aaa1"])
    nvml.nvmlDeviceGetCount = broken_count
    monkeypatch.setattr(gpu, "_nvml", lambda: nvml)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert gpu.visible_gpu_uuids() == []
