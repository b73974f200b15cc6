"""MODEL_SERVER_INT4_GLU_EPILOGUE: a merged INT4 gate/up projection whose Triton GEMM stores ``silu(gate) * up``
itself (model_server/int4_triton_glu.py), against the GEMM followed by the separate SiLU-mul, in Triton's
interpreter; the module and the MLP of the fast engine's layers take it only with the switch, and a decode step of a
tiny INT4 Llama with it and the split-K sums in their consumers gives the tokens of neither. (Its sm_90 compile: tests/test_int4_compile_check.py.)"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from model_server import int4_triton, int4_triton_config, int4_triton_glu
from model_server.engines.fast import fused
from model_server.engines.fast.layers import run_layers
from model_server.engines.fast.merged import merge
from model_server.int4 import Int4Linear
from model_server.int4_choice import ComputeChoice
from model_server.int4_quant import quantize_groupwise
from model_server.int4_triton_config import Config
from tests.int4_triton_support import (decode_off_on, fresh_switch, interpreter,  # noqa: F401 - autouse
                                      set_switch, tiny_int4_runner)


def _switch(monkeypatch, value: str) -> None:
    set_switch(monkeypatch, int4_triton_config.GLU_SWITCH, value, int4_triton_config.glu_on)


_fresh_switch = fresh_switch(int4_triton_config.glu_on)


def _weights(inter: int, k: int, dtype: torch.dtype, seed: int = 0):
    torch.manual_seed(seed)
    q, sz = quantize_groupwise(torch.randn(2 * inter, k) * 0.05, 64)
    return (int4_triton.pack_int4(q, 64), *int4_triton.split_scales_and_zeros(sz.to(dtype)))


def _agree(got: torch.Tensor, want: torch.Tensor) -> None:
    """The epilogue rounds where the separate ops round; only silu's exponential (Triton's vs torch's) may differ in
    the last fp32 bit, which a rounding to fp16 shows in a few elements at most, by one unit in the last place."""
    assert got.shape == want.shape and got.dtype == want.dtype
    if want.dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
        return
    differ = got != want
    assert int(differ.sum()) <= max(1, want.numel() // 200), int(differ.sum())
    ulp = torch.finfo(want.dtype).eps * want.float().abs().clamp_min(2.0 ** -14)
    assert bool(((got.float() - want.float()).abs() <= ulp).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("swap_ab", [True, False])
def test_the_epilogue_stores_what_the_gemm_then_silu_mul_give(dtype, swap_ab):
    inter, k = 80, 256                       # 80 outputs: the last tile of 32 gate + 32 up rows is partly masked
    ts = _weights(inter, k, dtype)
    x = (torch.randn(24, k) * 0.5).to(dtype)
    cfg = Config(16, 64, 1, 2, 4, swap_ab, False, True, False)
    y = int4_triton.int4_triton_mm(x, *ts, 64, cfg)
    want = fused.silu_mul(y[:, :inter], y[:, inter:])
    got = int4_triton_glu.int4_triton_glu(x, *ts, 64, cfg)
    _agree(got, want)
    assert float(want.float().abs().max()) > 0.01                   # (a product that is not all zeros)
    # the gate and up halves are not interchangeable: the check above sees a swapped or shifted tile
    assert not torch.allclose(fused.silu_mul(y[:, inter:], y[:, :inter]), want, rtol=1e-2, atol=1e-3)


def test_the_interpreters_gemm_keeps_its_store_after_a_compiled_gemm_is_made(monkeypatch):
    """Each mode's GEMM calls the GLU store jitted for its own mode: one process makes the compiled GEMM (the sm_90
    compile tests) and runs the interpreter's (CI failed once when a module global held the compiled store)."""
    ts = _weights(80, 256, torch.float32)
    x = torch.randn(24, 256)
    cfg = Config(16, 64, 1, 2, 4, True, False, True, False)
    before = int4_triton_glu.int4_triton_glu(x, *ts, 64, cfg)
    monkeypatch.delenv("TRITON_INTERPRET")
    compiled = int4_triton._jitted.__wrapped__(False)[0]   # (made afresh, whatever this process made before)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert type(compiled).__name__ == "JITFunction"
    assert torch.equal(int4_triton_glu.int4_triton_glu(x, *ts, 64, cfg), before)


def test_no_epilogue_where_the_gemm_splits_k_and_empty_rows_are_empty():
    ts = _weights(64, 512, torch.float32)
    x = torch.randn(5, 512)
    assert int4_triton.choose_config(5, 128, 512, 64, 8).split_k > 1      # 2 tiles on the interpreter's 8 "SMs"
    assert int4_triton_glu.int4_triton_glu(x, *ts, 64) is None
    assert int4_triton_glu.int4_triton_glu(x, *ts, 64, Config(16, 64, 2, 2, 4, True, False, True)) is None
    assert int4_triton_glu.int4_triton_glu(x[:0], *ts, 64, Config(16, 64, 1, 2, 4, True, False, True)).shape == (0, 64)
    with pytest.raises(ValueError, match="do not match"):
        int4_triton_glu.int4_triton_glu(x[:, :256], *ts, 64)


def _gate_up(inter: int, hidden: int, seed: int):
    torch.manual_seed(seed)
    choice = ComputeChoice(torch.float32, "triton", "test")
    parts = [Int4Linear(nn.Linear(hidden, inter, bias=False), 64, choice) for _ in range(2)]
    return parts, merge(parts)


def test_a_merged_gate_up_gives_the_activation_only_with_the_switch(monkeypatch):
    (gate, up), gu = _gate_up(512, 256, 1)
    assert gu is not None and gu.sizes == [512, 512]
    x = torch.randn(3, 8, 256)                   # 24 rows, 16 column tiles of the merged 1,024: no split K
    with torch.inference_mode():
        want = fused.silu_mul(gate(x), up(x))
        _switch(monkeypatch, "0")
        assert gu.silu_mul(x) is None
        _switch(monkeypatch, "1")
        got = gu.silu_mul(x)
        assert got is not None and got.shape == (3, 8, 512)
        _agree(got, want)
        assert gate.forward_silu_mul(x) is not None  # (any Int4Linear would; the merged module checks the halves)
        gu.sizes = [256, 768]
        assert gu.silu_mul(x) is None            # not two equal halves: not a gate/up
    _switch(monkeypatch, "on")
    with pytest.raises(Exception, match=int4_triton_config.GLU_SWITCH):
        _gate_up(64, 256, 2)


class _Norm(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.rand(n) + 0.5, requires_grad=False)
        self.variance_epsilon = 1e-5


def test_run_layers_takes_the_activation_from_the_gemm_with_the_switch(monkeypatch):
    hidden, inter = 256, 512
    ls, merged = [], []
    for i in range(2):
        (gate, up), gu = _gate_up(inter, hidden, 10 * i)
        down = Int4Linear(nn.Linear(inter, hidden, bias=False), 64, ComputeChoice(torch.float32, "triton", "test"))
        mlp = SimpleNamespace(gate_proj=gate, up_proj=up, down_proj=down)
        ls.append(SimpleNamespace(input_layernorm=_Norm(hidden), post_attention_layernorm=_Norm(hidden), mlp=mlp))
        merged.append(gu)
    ops = fused.Ops(False)
    calls = []
    real = ops.silu_mul
    ops.silu_mul = lambda g, u: calls.append(g.shape) or real(g, u)
    r = SimpleNamespace(ops=ops, layers=ls, norm=_Norm(hidden), silu_mlp=True, gate_up=merged)
    h = torch.randn(24, 1, hidden)
    out = {}
    with torch.inference_mode():
        for value in ("0", "1"):
            _switch(monkeypatch, value)
            out[value] = run_layers(r, h, lambda li, layer, x: x)
    assert calls == [(24, 1, inter)] * 2         # the separate op ran only with the switch off
    torch.testing.assert_close(out["1"], out["0"], rtol=1e-5, atol=1e-5)


def test_the_gpu_check_runs_its_bit_checks_on_cpu(tmp_path):
    """benchmarks/int4_glu_check.py (the GPU call's bit and time check) as a dry run in the interpreter: every row
    count it is given runs the epilogue and stays within a few units of the separate ops in a few elements."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "benchmarks/int4_glu_check.py", "--out", str(tmp_path), "--device", "cpu",
                        "--shape", "1024,256", "--ms", "24,40"], cwd=Path(__file__).resolve().parents[1], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads((tmp_path / "int4_glu_check.json").read_text())["rows"]
    assert [row["m"] for row in rows] == [24, 40]
    for row in rows:
        assert row["differ_vs_eager"] <= row["m"] * 512 // 200 and row["max_ulps_vs_eager"] <= 4, row


def test_both_launch_cuts_together_in_a_decode_step(monkeypatch):
    """MODEL_SERVER_INT4_SPLIT_SUM_IN_CONSUMER and MODEL_SERVER_INT4_GLU_EPILOGUE at once (the GPU call ``fuse64``):
    the epilogue in every layer, the q/k/v partials in the rotary + K/V write, and the logits and greedy tokens of
    neither switch."""
    from model_server import int4_triton_split
    from model_server.engines.fast import rope_kv

    runner = tiny_int4_runner(rope_kv=True)
    launches, qkv_dims = [], []
    real_glu, real_rope = int4_triton_glu.int4_triton_glu, rope_kv.rope_kv_write
    monkeypatch.setattr(int4_triton_glu, "int4_triton_glu",
                        lambda *a, **kw: launches.append(a[0].shape[0]) or real_glu(*a, **kw))
    monkeypatch.setattr("model_server.engines.fast.runner.rope_kv_write",
                        lambda qkv, *a: qkv_dims.append(qkv.dim()) or real_rope(qkv, *a))

    def both(value: str) -> None:
        _switch(monkeypatch, value)
        set_switch(monkeypatch, int4_triton_split.SUM_IN_CONSUMER_SWITCH, value, int4_triton_split.sum_in_consumer)
    try:
        out = decode_off_on(runner, both)
    finally:
        int4_triton_split.sum_in_consumer.cache_clear()
    assert launches == [40] * len(runner.layers) and qkv_dims == [2, 2, 3, 3]
    torch.testing.assert_close(out["1"][0], out["0"][0], rtol=1e-4, atol=1e-4)
    assert torch.equal(out["1"][0].argmax(-1), out["0"][0].argmax(-1))
    assert torch.equal(out["1"][1][:1], out["0"][1][:1])            # layer 0's K: before any MLP, the same bits


@pytest.mark.parametrize("module,switch,read", [
    ("int4_triton_config", "GLU_SWITCH", "glu_on"),
    ("int4_triton_split", "SUM_IN_CONSUMER_SWITCH", "sum_in_consumer")])
def test_both_launch_cuts_are_on_unless_switched_off(monkeypatch, module, switch, read):
    """Both cuts are the default since the H100 run of 2026-12-06 (docs/benchmarks.md, "fourth pass"): unset or
    ``1`` is on, ``0`` off, anything else a one-line error naming the switch."""
    import importlib

    mod = importlib.import_module(f"model_server.{module}")
    name, cached = getattr(mod, switch), getattr(mod, read)
    try:
        for value, on in (("", True), ("1", True), ("0", False)):
            set_switch(monkeypatch, name, value, cached)
            assert cached() is on, value
        set_switch(monkeypatch, name, "on", cached)
        with pytest.raises(Exception, match=name):
            cached()
    finally:
        cached.cache_clear()
