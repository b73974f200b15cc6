"""The background warm-up compiles the CUDA mma kernel's configurations first, on every start
(model_server.engines.fast.warmup, int4_precompile.precompile_mma): before the hold and the first request, whether or
not the fused ops compile, the merged projections' shapes included; a failure there is one warning, not a failed
warm-up. The compile itself is NVRTC's on a GPU (tests/test_int4_mma_nvrtc.py compiles the source); here each
request for a configuration is recorded."""
from __future__ import annotations

import logging
import time

import pytest
import torch
from torch import nn

from model_server import int4_mma
from model_server.engines.fast import fused
from model_server.engines.fast.warmup import BackgroundWarmup
from model_server.int4 import ComputeChoice, Int4Linear, mma_max_rows


class _Runner:
    device = torch.device("cpu")
    dtype = torch.float32
    use_graphs = False

    def __init__(self, fuse: bool, model: nn.Module, qkv: list[nn.Module | None]) -> None:
        self.fuse_requested = fuse
        self.model, self.qkv, self.gate_up = model, qkv, [None]


@pytest.fixture
def asked(monkeypatch) -> list[tuple[str, int]]:
    monkeypatch.setattr(int4_mma, "reserve", lambda *a, **k: None)
    monkeypatch.setattr(int4_mma, "_num_sms", lambda dev: 132)
    monkeypatch.setattr(int4_mma, "device_index", lambda dev: 0)
    seen: list[tuple[str, int]] = []
    monkeypatch.setattr(int4_mma, "kernel", lambda name, index: seen.append((name, index)))
    return seen


def _mma(n: int) -> Int4Linear:
    return Int4Linear(nn.Linear(256, n, bias=False), 64, ComputeChoice(torch.float32, "mma", "test",
                                                                        rows_kernel="triton"))


def _want(*ns: int) -> set[tuple[str, int]]:
    return {(int4_mma.choose_config(r, n, 256, 132).name(), 0) for n in ns for r in range(1, mma_max_rows(n) + 1)}


def _wait_for(cond, seconds: float = 5.0) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.01)
    return cond()


def test_without_fused_ops_the_warmup_compiles_the_mma_configs_at_once(asked) -> None:
    merged = nn.ModuleList([_mma(16384)])                   # a merged projection: a shape of its own
    w = BackgroundWarmup(_Runner(False, nn.ModuleList([_mma(2048)]), [merged]), hold_s=30)
    t0 = time.monotonic()
    w.start()
    assert w.done.wait(5) and time.monotonic() - t0 < 30    # no hold: nothing else to compile
    assert set(asked) == _want(2048, 16384) and len(asked) == len(set(asked)) == w.mma_compiled


def test_the_mma_configs_compile_before_the_first_request_and_the_fused_ops_after(asked) -> None:
    called: list[float] = []

    def make_ops(*_a):
        called.append(time.monotonic())
        return fused.Ops(False)

    w = BackgroundWarmup(_Runner(True, nn.ModuleList([_mma(2048)]), [None]), make_ops=make_ops, hold_s=30)
    w.start()
    assert _wait_for(lambda: len(asked) == len(_want(2048)))
    time.sleep(0.1)
    assert called == [] and not w.done.is_set()             # the fused compile still waits for its turn
    w.served()
    w.idle()
    assert w.done.wait(5) and len(called) == 1 and set(asked) == _want(2048)


def test_no_mma_layer_and_no_fused_ops_means_no_thread(asked) -> None:
    plain = ComputeChoice(torch.float32, "cpu-int4pack", "test")
    w = BackgroundWarmup(_Runner(False, nn.ModuleList([Int4Linear(nn.Linear(256, 64, bias=False), 64, plain)]),
                                 [None]), hold_s=30)
    w.start()
    assert w.done.is_set() and w._thread is None and asked == [] and w.mma_modules == []


def test_a_failing_mma_compile_is_one_warning_and_the_warmup_goes_on(monkeypatch, caplog) -> None:
    monkeypatch.setattr(int4_mma, "reserve", lambda *a, **k: None)
    monkeypatch.setattr(int4_mma, "_num_sms", lambda dev: 132)
    monkeypatch.setattr(int4_mma, "device_index", lambda dev: 0)

    def fail(name: str, index: int) -> None:
        raise RuntimeError("NVRTC could not compile it")
    monkeypatch.setattr(int4_mma, "kernel", fail)
    w = BackgroundWarmup(_Runner(False, nn.ModuleList([_mma(2048)]), [None]), hold_s=30)
    with caplog.at_level(logging.INFO, logger="model_server.engines.fast.warmup"):
        w.start()
        assert w.done.wait(5)
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "not compiled ahead" in warned[0].getMessage() and w.mma_compiled == 0
