"""MODEL_SERVER_INT4_SPLIT_SUM_IN_CONSUMER: the INT4 Triton GEMM's split-K partial sums handed to the fast engine's
residual add + RMSNorm instead of a sum kernel (the rotary + K/V write's side: tests/test_fast_rope_kv.py). The same
bits as the sum kernel's path, in Triton's interpreter."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from model_server import int4_triton, int4_triton_split
from model_server.engines.fast import fused
from model_server.engines.fast.layers import project_out, run_layers
from model_server.int4 import Int4Linear
from model_server.int4_choice import ComputeChoice
from model_server.int4_quant import quantize_groupwise
from model_server.int4_triton_config import Config
from tests.int4_triton_support import (decode_off_on, fresh_switch, interpreter,  # noqa: F401 - autouse
                                      set_switch, tiny_int4_runner)


def _switch(monkeypatch, value: str) -> None:
    set_switch(monkeypatch, int4_triton_split.SUM_IN_CONSUMER_SWITCH, value, int4_triton_split.sum_in_consumer)


_fresh_switch = fresh_switch(int4_triton_split.sum_in_consumer)


def ordered_sum(parts: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    y = parts[0]
    for s in range(1, parts.shape[0]):
        y = y + parts[s]
    return y.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_partials_summed_in_split_order_are_the_sum_kernels_bits(dtype):
    torch.manual_seed(0)
    q, sz = quantize_groupwise(torch.randn(64, 512) * 0.05, 64)
    ts = (int4_triton.pack_int4(q, 64), *int4_triton.split_scales_and_zeros(sz.to(dtype)))
    x = torch.randn(40, 512).to(dtype)
    cfg = Config(64, 64, 4, 3, 4, True, False)
    y = int4_triton.int4_triton_mm(x, *ts, 64, cfg, "kernel")
    parts = int4_triton.int4_triton_mm(x, *ts, 64, cfg, "kernel", partials=True)
    assert parts.shape == (4, 40, 64) and parts.dtype == torch.float32
    assert torch.equal(ordered_sum(parts, dtype), y)
    # no sum kernel to skip: the ticket (or no split) gives the product itself
    assert torch.equal(int4_triton.int4_triton_mm(x, *ts, 64, cfg, "ticket", partials=True), y)
    one = Config(64, 64, 1, 3, 4, True, False)
    assert int4_triton.int4_triton_mm(x, *ts, 64, one, partials=True).shape == (40, 64)


def _layer(n: int, k: int, bias: bool = False, seed: int = 0) -> Int4Linear:
    torch.manual_seed(seed)
    return Int4Linear(nn.Linear(k, n, bias=bias), 64, ComputeChoice(torch.float32, "triton", "test"))


def test_forward_partials_unless_switched_off_and_only_where_the_sum_kernel_would_run(monkeypatch):
    lin = _layer(256, 256)                       # 4 column tiles on the interpreter's 8 "SMs": split K 2
    x = torch.randn(5, 8, 256)                   # 40 rows: above the ticket's 32, the sum kernel's range
    with torch.inference_mode():
        want = lin(x)
        _switch(monkeypatch, "0")
        assert torch.equal(lin.forward_partials(x), want)
        for value in ("", "1"):                  # on by default
            _switch(monkeypatch, value)
            parts = lin.forward_partials(x)
            assert parts.shape == (2, 5, 8, 256)
        _switch(monkeypatch, "1")
        parts = lin.forward_partials(x)
        assert parts.shape == (2, 5, 8, 256)
        assert torch.equal(ordered_sum(parts, torch.float32), want)
        small = torch.randn(2, 8, 256)           # 16 rows: the ticket sums, nothing to hand over
        assert torch.equal(lin.forward_partials(small), lin(small))
        biased = _layer(256, 256, bias=True)
        assert torch.equal(biased.forward_partials(x), biased(x))
    _switch(monkeypatch, "yes")
    with pytest.raises(Exception, match=int4_triton_split.SUM_IN_CONSUMER_SWITCH):
        _layer(64, 256)


def test_add_parts_rms_norm_is_add_rms_norm_of_the_ordered_sum():
    torch.manual_seed(1)
    h = torch.randn(3, 1, 64, dtype=torch.bfloat16)
    w = torch.rand(64, dtype=torch.bfloat16) + 0.5
    for s in (2, 4, 8):
        parts = torch.randn(s, 3, 1, 64) * 3
        got = fused.add_parts_rms_norm(h, parts, w, 1e-5)
        want = fused.add_rms_norm(h, ordered_sum(parts, torch.bfloat16), w, 1e-5)
        assert all(torch.equal(g, e) for g, e in zip(got, want))
    traced = torch.compile(fused.add_parts_rms_norm, backend="eager", dynamic=True, fullgraph=True)
    for s in (2, 4):                             # traces whole (no graph break) for each split
        parts = torch.randn(s, 3, 1, 64)
        assert all(torch.equal(g, e) for g, e in zip(traced(h, parts, w, 1e-5),
                                                     fused.add_parts_rms_norm(h, parts, w, 1e-5)))


class _Norm(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.rand(n) + 0.5, requires_grad=False)
        self.variance_epsilon = 1e-5


def _runner(layers: int, hidden: int = 256, inter: int = 512):
    """What run_layers reads of a ModelRunner: INT4 o and down projections (Triton), eager ops."""
    ls = []
    for i in range(layers):
        mlp = SimpleNamespace(gate_proj=_layer(inter, hidden, seed=10 * i + 1),
                              up_proj=_layer(inter, hidden, seed=10 * i + 2), down_proj=_layer(hidden, inter, seed=10 * i + 3))
        ls.append(SimpleNamespace(input_layernorm=_Norm(hidden), post_attention_layernorm=_Norm(hidden), mlp=mlp,
                                  self_attn=SimpleNamespace(o_proj=_layer(hidden, hidden, seed=10 * i + 4))))
    return SimpleNamespace(ops=fused.Ops(False), layers=ls, norm=_Norm(hidden), silu_mlp=True, gate_up=[None] * layers)


def test_run_layers_with_partials_gives_the_same_bits(monkeypatch):
    torch.manual_seed(2)
    r = _runner(2)
    h = torch.randn(40, 1, 256)
    calls = []
    real = r.ops.add_parts_rms_norm
    r.ops.add_parts_rms_norm = lambda *a: calls.append(a[1].shape) or real(*a)

    def attend(li, layer, x):
        return project_out(layer.self_attn.o_proj, x)
    with torch.inference_mode():
        _switch(monkeypatch, "0")
        want = run_layers(r, h, attend)
        assert calls == []
        _switch(monkeypatch, "1")
        got = run_layers(r, h, attend)
    assert calls == [(2, 40, 1, 256)] * 4        # o and down of both layers, split K 2
    assert torch.equal(got, want)


def test_a_decode_step_of_an_int4_model_gives_the_same_logits_with_partials(monkeypatch):
    """The fast engine's decode step at 40 rows (the sum kernel's range) on a tiny INT4 Llama whose q/k/v, o and
    down projections split K in the interpreter: the same logits and K cache with the partials summed by the
    rotary + K/V write and the add + norm as with the sum kernel."""
    from model_server.engines.fast import rope_kv

    runner = tiny_int4_runner(rope_kv=True)
    seen = []
    real = rope_kv.rope_kv_write
    monkeypatch.setattr("model_server.engines.fast.runner.rope_kv_write",
                        lambda qkv, *a: seen.append(qkv.dim()) or real(qkv, *a))
    out = decode_off_on(runner, lambda v: _switch(monkeypatch, v))
    assert seen == [2, 2, 3, 3]                  # the partials reached the rotary + K/V write with the switch on
    assert all(torch.equal(a, b) for a, b in zip(out["0"], out["1"]))
