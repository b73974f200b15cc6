"""The INT4 Triton GEMM's switches (model_server/int4_triton_config.py): how it dequantizes
(MODEL_SERVER_INT4_TRITON_DEQ), its pipeline stages above 32 rows (_STAGES) and two experiments (_PDL, _FENCE): each
read once, a bad value failing the load. Triton's CPU interpreter runs the kernel where one is launched."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from model_server import int4_triton
from model_server import int4_triton_config as cfgmod
from model_server.int4 import ComputeChoice, Int4Linear
from model_server.int4_quant import quantize_groupwise
from model_server.switches import SwitchValueError
from tests.int4_triton_support import interpreter, reference, rel  # noqa: F401 (interpreter: an autouse fixture)

READERS = (cfgmod.deq_mode, cfgmod.pdl_on, cfgmod.fence_on, cfgmod.stages_override)


@pytest.fixture(autouse=True)
def _fresh_reads():
    """Each switch is read once per process (lru_cache): read afresh in every test and after it."""
    for read in READERS:
        read.cache_clear()
    yield
    for read in READERS:
        read.cache_clear()


def _set(monkeypatch, name: str, value: str, read) -> None:
    monkeypatch.setenv(name, value)
    read.cache_clear()


def _load() -> Int4Linear:
    return Int4Linear(nn.Linear(256, 48), 64, ComputeChoice(torch.float32, "triton", "test"))


def test_the_dequantization_switch(monkeypatch):
    _set(monkeypatch, cfgmod.DEQ_SWITCH, "", cfgmod.deq_mode)
    assert cfgmod.deq_mode() == "auto"                                # fma-ptx at every row count
    assert [(c.fma, c.ptx) for c in (int4_triton.choose_config(m, 2048, 2048, 128, 132) for m in (1, 64, 65, 2048))] \
        == [(True, True)] * 4
    for value in ("fp32", "fma", "fma-ptx"):
        _set(monkeypatch, cfgmod.DEQ_SWITCH, value, cfgmod.deq_mode)
        assert cfgmod.deq_mode() == value
        cfg = int4_triton.choose_config(64, 2048, 2048, 128, 132)
        assert (cfg.fma, cfg.ptx) == (value != "fp32", value == "fma-ptx")
        want = {"fp32": 0, "fma": 1, "fma-ptx": 2}[value]
        assert cfgmod.deq(cfg, 0x4300, False) == want
        assert cfgmod.deq(cfg, 0x4300, True) == min(want, 1)               # the interpreter runs no PTX
        assert cfgmod.deq(cfg, 0, False) == min(want, 1)                   # fp32 (no magic): the plain unpack
    _set(monkeypatch, cfgmod.DEQ_SWITCH, "bf16", cfgmod.deq_mode)
    with pytest.raises(SwitchValueError, match=f"^{cfgmod.DEQ_SWITCH} must be one of auto, fp32, fma, fma-ptx"):
        cfgmod.deq_mode()
    with pytest.raises(SwitchValueError):                              # at load, not at the first step
        _load()


@pytest.mark.parametrize("name,read,default", [(cfgmod.PDL_SWITCH, cfgmod.pdl_on, True),
                                               (cfgmod.FENCE_SWITCH, cfgmod.fence_on, False)])
def test_pdl_is_on_and_the_fence_off_unless_asked(monkeypatch, name, read, default):
    """PDL is on unless ``0``; the async-proxy fence off unless ``1``; either way the interpreter (no GPU) still
    computes the product (both take effect only on a GPU of compute capability >= 9.0:
    tests/test_int4_compile_check.py compiles them); a bad value fails the load."""
    for value, want in (("", default), ("0", False), ("1", True)):
        _set(monkeypatch, name, value, read)
        assert read() is want
        q, sz = quantize_groupwise(torch.randn(64, 256) * 0.05, 64)
        x = torch.randn(40, 256)
        y = int4_triton.int4_triton_mm(x, int4_triton.pack_int4(q, 64), *int4_triton.split_scales_and_zeros(sz), 64)
        assert rel(y, reference(x, q, sz, 64)) < 1e-5
    _set(monkeypatch, name, "yes", read)
    with pytest.raises(SwitchValueError, match=name):
        _load()


def test_the_pipeline_stages_switch(monkeypatch):
    """MODEL_SERVER_INT4_TRITON_STAGES sets the stages of steps of more than 32 rows (A/B); 32 rows and fewer keep 4."""
    _set(monkeypatch, cfgmod.STAGES_SWITCH, "", cfgmod.stages_override)
    assert [int4_triton.choose_config(m, 2048, 2048, 128, 132).num_stages for m in (8, 32, 33, 64, 65, 256)] \
        == [4, 4, 4, 4, 3, 3]                                         # never 3 stages at 33-64 rows
    assert [int4_triton.choose_config(m, 128256, 2048, 128, 132).num_stages for m in (32, 48, 64, 65)] \
        == [4, 2, 2, 3]                                               # the LM head: 2 there
    for value, want in (("2", 2), ("5", 5)):
        _set(monkeypatch, cfgmod.STAGES_SWITCH, value, cfgmod.stages_override)
        assert [int4_triton.choose_config(m, 2048, 2048, 128, 132).num_stages for m in (8, 32, 64, 256)] \
            == [4, 4, want, want]
    _set(monkeypatch, cfgmod.STAGES_SWITCH, "9", cfgmod.stages_override)
    with pytest.raises(SwitchValueError, match=cfgmod.STAGES_SWITCH):
        int4_triton.choose_config(64, 2048, 2048, 128, 132)
    with pytest.raises(SwitchValueError, match=cfgmod.STAGES_SWITCH):   # at load, not at the first step
        _load()
