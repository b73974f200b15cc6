"""The mma mode's int4pack copy for steps of few rows on narrow layers (model_server/int4_choice.py's
``mma_int4pack_rows``, model_server/int4.py's ``Int4Linear``), on CPU.

The mma kernel is CUDA's: here it is replaced by a reference that reads only the mma buffers (as in
tests/test_int4_mma.py), while the int4pack copy runs PyTorch's real CPU int4pack kernel. Which of the two ran is
told by what each one computes from (the copy is corrupted on purpose in one test), not by a flag.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from model_server import int4_mma
from model_server.int4_choice import (MMA_INT4PACK_ROWS, MMA_INT4PACK_SWITCH, choose_compute, mma_int4pack_rows,
                                      mma_int4pack_switch, step_kernel)
from model_server.int4_quant import dequantize_groupwise
from model_server.switches import SwitchValueError


@pytest.fixture(autouse=True)
def _fresh_switch(monkeypatch):
    monkeypatch.delenv(MMA_INT4PACK_SWITCH, raising=False)
    mma_int4pack_switch.cache_clear()
    yield
    mma_int4pack_switch.cache_clear()


def test_narrow_layers_take_int4pack_for_few_rows_and_the_switch_sets_how_few(monkeypatch) -> None:
    # the 1B preset's q/k/v and o are narrow; down (8,192 inputs), gate/up and the LM head are not
    assert [mma_int4pack_rows(n, k) for n, k in ((3072, 2048), (2048, 2048), (4096, 4096))] == [MMA_INT4PACK_ROWS] * 3
    assert [mma_int4pack_rows(n, k) for n, k in ((2048, 8192), (16384, 2048), (128256, 2048), (4104, 2048))] == \
        [0, 0, 0, 0]
    assert MMA_INT4PACK_ROWS == 4
    kernels = [step_kernel("mma", "triton", r, 3072, mma_int4pack_rows(3072, 2048)) for r in (1, 4, 5, 16, 17, 64)]
    assert kernels == ["cuda-int4pack", "cuda-int4pack", "mma", "mma", "triton", "triton"]
    assert step_kernel("mma", "triton", 1, 2048, mma_int4pack_rows(2048, 8192)) == "mma"
    assert step_kernel("mma", "triton", 1, 3072) == "mma"                 # a layer holding no copy
    assert "int4pack up to 4 rows" in choose_compute("cuda", (9, 0), triton=True, mma=True).reason
    monkeypatch.setenv(MMA_INT4PACK_SWITCH, "0")
    mma_int4pack_switch.cache_clear()
    assert mma_int4pack_rows(3072, 2048) == 0
    assert "int4pack" not in choose_compute("cuda", (9, 0), triton=True, mma=True).reason
    monkeypatch.setenv(MMA_INT4PACK_SWITCH, "8")
    mma_int4pack_switch.cache_clear()
    assert mma_int4pack_rows(2048, 2048) == 8 and mma_int4pack_rows(2048, 8192) == 0
    for bad in ("9", "-1", "two"):
        monkeypatch.setenv(MMA_INT4PACK_SWITCH, bad)
        mma_int4pack_switch.cache_clear()
        with pytest.raises(SwitchValueError, match=MMA_INT4PACK_SWITCH):
            mma_int4pack_rows(2048, 2048)


def _mma_reference(x, words, scales, group):
    """x @ dequant(W).T from the mma layout alone (tests/test_int4_mma.py's reference, by way of its unpackers)."""
    from tests.test_int4_mma import _mma_reference as ref
    return ref(x, words, scales, group).to(x.dtype)


def _layers(monkeypatch, outs: tuple[int, ...], k: int = 256):
    from model_server.int4 import ComputeChoice, Int4Linear
    monkeypatch.setattr(int4_mma, "reserve", lambda dev, n, kk, rows=64: None)
    calls: list[int] = []

    def mma(x, w, s, g, config=None):
        calls.append(x.shape[0])
        return _mma_reference(x, w, s, g)
    monkeypatch.setattr(int4_mma, "int4_mma_mm", mma)
    choice = ComputeChoice(torch.float32, "mma", "test", rows_kernel="triton")
    torch.manual_seed(5)
    return [Int4Linear(nn.Linear(k, n, bias=False), 64, choice) for n in outs], calls


def test_a_narrow_mma_layer_holds_the_copy_and_runs_it_for_few_rows(monkeypatch) -> None:
    (layer,), mma_calls = _layers(monkeypatch, (64,))
    assert layer.kernel == "mma" and layer.int4pack_rows == 4 and layer.int4pack_kernel == "cpu-int4pack"
    assert "up to 4 rows=cuda-int4pack" in repr(layer)
    for rows in (1, 4, 5, 8):
        x = torch.randn(rows, 256)
        want = _mma_reference(x, layer.mma_words, layer.mma_scales, 64)
        assert torch.allclose(layer(x), want, atol=2e-2)     # the same weight (the mma layout's scales are bf16)
    assert mma_calls == [5, 8]                                           # 1 and 4 rows ran int4pack
    with torch.no_grad():                                                # corrupt the copy: few rows see it, 5 do not
        layer.weight_packed.copy_(torch.zeros_like(layer.weight_packed))
    x = torch.randn(5, 256)
    assert not torch.allclose(layer(x[:1]), _mma_reference(x[:1], layer.mma_words, layer.mma_scales, 64), atol=1e-2)
    assert torch.equal(layer(x), _mma_reference(x, layer.mma_words, layer.mma_scales, 64))


def test_wide_layers_and_the_switch_at_0_hold_no_copy(monkeypatch) -> None:
    (wide,), _ = _layers(monkeypatch, (64,), k=8192)
    assert wide.int4pack_rows == 0 and not hasattr(wide, "weight_packed")
    monkeypatch.setenv(MMA_INT4PACK_SWITCH, "0")
    mma_int4pack_switch.cache_clear()
    (off,), calls = _layers(monkeypatch, (64,))
    assert off.int4pack_rows == 0 and not hasattr(off, "weight_packed")
    off(torch.randn(1, 256))
    assert calls == [1]
    q_bytes = sum(b.numel() * b.element_size() for b in off.buffers() if b is not None)
    monkeypatch.delenv(MMA_INT4PACK_SWITCH)
    mma_int4pack_switch.cache_clear()
    (on,), _ = _layers(monkeypatch, (64,))
    on_bytes = sum(b.numel() * b.element_size() for b in on.buffers() if b is not None)
    assert on_bytes > q_bytes                                            # the copy is counted in the layer's bytes


def test_merged_parts_keep_the_copy_and_equal_their_parts(monkeypatch) -> None:
    from model_server.engines.fast import merged
    parts, calls = _layers(monkeypatch, (64, 32, 32))
    assert all(p.int4pack_rows == 4 for p in parts)
    m = merged._merge_int4(parts)
    assert m is not None and m.int4pack_rows == 4 and m.int4pack_kernel == "cpu-int4pack"
    for rows in (2, 6):
        x = torch.randn(rows, 256)
        want = torch.cat([p(x) for p in parts], dim=-1)
        got = m(x)
        assert torch.equal(got, want) if rows <= 4 else torch.allclose(got, want, rtol=1e-5, atol=1e-5)
    q = int4_mma.unpack(m.mma_words)                                     # the copy holds the merged weight too
    x = torch.randn(1, 256)
    sz = m.scales_and_zeros.float()
    assert torch.allclose(m(x), x @ dequantize_groupwise(q, sz, 64).t(), rtol=1e-5, atol=1e-5)
