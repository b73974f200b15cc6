"""The INT4 Triton GEMM's switches (model_server/int4_triton_config.py): how it dequantizes
(MODEL_SERVER_INT4_TRITON_DEQ), its pipeline stages above 32 rows (_STAGES) and two experiments (_PDL, _FENCE): each
read once, a bad value failing the load. Triton's CPU interpreter runs the kernel where one is launched."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from model_server import int4_triton, int4_triton_config
from model_server.int4 import ComputeChoice, Int4Linear
from model_server.int4_quant import dequantize_groupwise, quantize_groupwise


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert int4_triton.available()


def _reference(x: torch.Tensor, q: torch.Tensor, sz: torch.Tensor, group: int) -> torch.Tensor:
    return x.double() @ dequantize_groupwise(q, sz, group).double().t()


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want).norm() / want.norm())


def test_the_dequantization_switch(monkeypatch):
    from model_server.switches import SwitchValueError
    cfgmod = int4_triton_config
    try:
        monkeypatch.setenv(cfgmod.DEQ_SWITCH, "")
        cfgmod.deq_mode.cache_clear()
        assert cfgmod.deq_mode() == "auto"                            # fma-ptx at every row count
        assert [(c.fma, c.ptx) for c in (int4_triton.choose_config(m, 2048, 2048, 128, 132) for m in (1, 64, 65, 2048))] \
            == [(True, True)] * 4
        for value in ("fp32", "fma", "fma-ptx"):
            monkeypatch.setenv(cfgmod.DEQ_SWITCH, value)
            cfgmod.deq_mode.cache_clear()
            assert cfgmod.deq_mode() == value
            cfg = int4_triton.choose_config(64, 2048, 2048, 128, 132)
            assert (cfg.fma, cfg.ptx) == (value != "fp32", value == "fma-ptx")
            want = {"fp32": 0, "fma": 1, "fma-ptx": 2}[value]
            assert cfgmod.deq(cfg, 0x4300, False) == want
            assert cfgmod.deq(cfg, 0x4300, True) == min(want, 1)           # the interpreter runs no PTX
            assert cfgmod.deq(cfg, 0, False) == min(want, 1)               # fp32 (no magic): the plain unpack
        monkeypatch.setenv(cfgmod.DEQ_SWITCH, "bf16")
        cfgmod.deq_mode.cache_clear()
        with pytest.raises(SwitchValueError, match=f"^{cfgmod.DEQ_SWITCH} must be one of auto, fp32, fma, fma-ptx"):
            cfgmod.deq_mode()
        with pytest.raises(SwitchValueError):                          # at load, not at the first step
            Int4Linear(nn.Linear(256, 48), 64, ComputeChoice(torch.float32, "triton", "test"))
    finally:
        monkeypatch.delenv(cfgmod.DEQ_SWITCH)
        cfgmod.deq_mode.cache_clear()


def test_the_programmatic_dependent_launch_switch(monkeypatch):
    """Off unless ``1``; a bad value fails the load; on, the interpreter (no GPU) still computes the product (the
    kernel takes PDL only on a GPU of compute capability >= 9.0: tests/test_int4_compile_check.py compiles it)."""
    from model_server.switches import SwitchValueError
    cfgmod = int4_triton_config
    try:
        for value, want in (("", False), ("0", False), ("1", True)):
            monkeypatch.setenv(cfgmod.PDL_SWITCH, value)
            cfgmod.pdl_on.cache_clear()
            assert cfgmod.pdl_on() is want
        q, sz = quantize_groupwise(torch.randn(64, 256) * 0.05, 64)
        x = torch.randn(40, 256)
        y = int4_triton.int4_triton_mm(x, int4_triton.pack_int4(q, 64), *int4_triton.split_scales_and_zeros(sz), 64)
        assert _rel(y, _reference(x, q, sz, 64)) < 1e-5
        monkeypatch.setenv(cfgmod.PDL_SWITCH, "yes")
        cfgmod.pdl_on.cache_clear()
        with pytest.raises(SwitchValueError, match=cfgmod.PDL_SWITCH):
            Int4Linear(nn.Linear(256, 48), 64, ComputeChoice(torch.float32, "triton", "test"))
    finally:
        monkeypatch.delenv(cfgmod.PDL_SWITCH)
        cfgmod.pdl_on.cache_clear()


def test_the_fence_switch(monkeypatch):
    """MODEL_SERVER_INT4_TRITON_FENCE: off unless ``1``; a bad value fails the load (its place in the compiled loop:
    tests/test_int4_compile_check.py)."""
    from model_server.switches import SwitchValueError
    cfgmod = int4_triton_config
    try:
        for value, want in (("", False), ("0", False), ("1", True)):
            monkeypatch.setenv(cfgmod.FENCE_SWITCH, value)
            cfgmod.fence_on.cache_clear()
            assert cfgmod.fence_on() is want
        monkeypatch.setenv(cfgmod.FENCE_SWITCH, "on")
        cfgmod.fence_on.cache_clear()
        with pytest.raises(SwitchValueError, match=cfgmod.FENCE_SWITCH):
            Int4Linear(nn.Linear(256, 48), 64, ComputeChoice(torch.float32, "triton", "test"))
    finally:
        monkeypatch.delenv(cfgmod.FENCE_SWITCH)
        cfgmod.fence_on.cache_clear()


def test_the_pipeline_stages_switch(monkeypatch):
    """MODEL_SERVER_INT4_TRITON_STAGES sets the stages of steps of more than 32 rows (A/B); 32 rows and fewer keep 4."""
    from model_server.switches import SwitchValueError
    cfgmod = int4_triton_config
    try:
        monkeypatch.setenv(cfgmod.STAGES_SWITCH, "")
        cfgmod.stages_override.cache_clear()
        assert [int4_triton.choose_config(m, 2048, 2048, 128, 132).num_stages for m in (8, 32, 33, 64, 65, 256)] \
            == [4, 4, 4, 4, 3, 3]                                     # never 3 stages at 33-64 rows
        assert [int4_triton.choose_config(m, 128256, 2048, 128, 132).num_stages for m in (32, 48, 64, 65)] \
            == [4, 2, 2, 3]                                           # the LM head: 2 there
        for value, want in (("2", 2), ("5", 5)):
            monkeypatch.setenv(cfgmod.STAGES_SWITCH, value)
            cfgmod.stages_override.cache_clear()
            assert [int4_triton.choose_config(m, 2048, 2048, 128, 132).num_stages for m in (8, 32, 64, 256)] \
                == [4, 4, want, want]
        monkeypatch.setenv(cfgmod.STAGES_SWITCH, "9")
        cfgmod.stages_override.cache_clear()
        with pytest.raises(SwitchValueError, match=cfgmod.STAGES_SWITCH):
            int4_triton.choose_config(64, 2048, 2048, 128, 132)
        with pytest.raises(SwitchValueError, match=cfgmod.STAGES_SWITCH):   # at load, not at the first step
            Int4Linear(nn.Linear(256, 48), 64, ComputeChoice(torch.float32, "triton", "test"))
    finally:
        monkeypatch.delenv(cfgmod.STAGES_SWITCH)
        cfgmod.stages_override.cache_clear()
