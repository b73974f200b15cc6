"""MODEL_SERVER_INT4_TRITON_PAIRED_SCALES (model_server/int4_triton_config.py): the Triton GEMM reading each group's
(scale, zero) as one 32-bit word (model_server/int4_triton_layout.pair_scales_and_zeros) gives the bits of the split
scales and zeros, in the GEMM, its split-K sums and its GLU epilogue (Triton's CPU interpreter, fp16: it cannot
bit-cast to bf16); an INT4 layer holds the words only with the switch and a 16-bit compute dtype, a merged layer
joins them, and a bad value fails the load. Where the words land in the compiled sm_90 main loop is
tests/test_int4_compile_check.py's."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from model_server import int4_triton, int4_triton_glu
from model_server import int4_triton_config as cfgmod
from model_server.engines.fast.merged import merge
from model_server.int4 import ComputeChoice, Int4Linear
from model_server.int4_quant import quantize_groupwise
from model_server.int4_triton_config import Config
from model_server.switches import SwitchValueError
from tests.int4_triton_support import fresh_switch, interpreter, reference, rel, set_switch  # noqa: F401

_fresh = fresh_switch(cfgmod.paired_scales_on)


def _weights(n: int, k: int, dtype: torch.dtype, seed: int = 0):
    torch.manual_seed(seed)
    q, sz = quantize_groupwise(torch.randn(n, k) * 0.05, 64)
    sz = sz.to(dtype)
    return q, sz, int4_triton.pack_int4(q, 64), *int4_triton.split_scales_and_zeros(sz)


def test_the_words_hold_the_scale_in_the_low_half_and_bad_input_is_one_error():
    sz = torch.randn(3, 5, 2).to(torch.bfloat16)
    words = int4_triton.pair_scales_and_zeros(sz)
    assert words.dtype == torch.int32 and words.shape == (3, 5)
    assert torch.equal((words & 0xFFFF).to(torch.int16).view(torch.bfloat16), sz[..., 0])
    assert torch.equal((words >> 16).to(torch.int16).view(torch.bfloat16), sz[..., 1])
    for bad in (torch.randn(3, 5, 2), torch.randn(3, 5).half(), torch.randn(3, 5, 3).half()):
        with pytest.raises(ValueError, match="^pairing needs"):
            int4_triton.pair_scales_and_zeros(bad)


@pytest.mark.parametrize("rows,cfg", [
    (24, Config(16, 64, 1, 2, 4, True, False, True, False)),      # swap-AB, dequantizing by FMA
    (40, Config(64, 64, 1, 2, 4, True, False, False, False)),     # swap-AB, fp32 dequantization
    (70, Config(128, 64, 1, 3, 4, False, False, True, False)),    # the normal order (prefill)
    (33, Config(64, 64, 2, 2, 4, True, False, True, False)),      # split K, summed by the ticket
])
def test_paired_words_give_the_same_bits_as_split_scales(rows, cfg):
    q, sz, packed, scales, zeros = _weights(96, 256, torch.float16)
    x = (torch.randn(rows, 256) * 0.5).half()
    split = int4_triton.int4_triton_mm(x, packed, scales, zeros, 64, cfg)
    paired = int4_triton.int4_triton_mm(x, packed, int4_triton.pair_scales_and_zeros(sz), zeros, 64, cfg)
    assert torch.equal(paired, split)
    assert rel(paired, reference(x, q, sz, 64)) < 3e-3               # and both are the product


def test_the_glu_epilogue_reads_the_words_too():
    q, sz, packed, scales, zeros = _weights(128, 256, torch.float16, seed=3)
    x = (torch.randn(24, 256) * 0.5).half()
    cfg = Config(16, 64, 1, 2, 4, True, False, True, False)
    split = int4_triton_glu.int4_triton_glu(x, packed, scales, zeros, 64, cfg)
    paired = int4_triton_glu.int4_triton_glu(x, packed, int4_triton.pair_scales_and_zeros(sz), zeros, 64, cfg)
    assert torch.equal(paired, split) and float(split.abs().max()) > 0.01


def test_the_prefill_pass_dequantizes_the_words_to_the_same_weight():
    from model_server import int4_dequant
    _, sz, packed, scales, zeros = _weights(96, 256, torch.float16, seed=5)
    words = int4_triton.pair_scales_and_zeros(sz)
    split = int4_dequant.dequantize(packed, scales, zeros, 64, torch.float16)
    assert torch.equal(int4_dequant.dequantize(packed, words, words, 64, torch.float16), split)
    with pytest.raises(ValueError, match="^paired scales and zeros .* dequantize to a 16-bit dtype"):
        int4_dequant.dequantize(packed, words, words, 64, torch.float32)


def test_words_with_fp32_activations_are_refused_in_one_line():
    _, sz, packed, _, zeros = _weights(64, 256, torch.float16)
    with pytest.raises(ValueError, match="^paired scales and zeros .* need 16-bit activations"):
        int4_triton.int4_triton_mm(torch.randn(4, 256), packed, int4_triton.pair_scales_and_zeros(sz), zeros, 64)


def _layer(dtype: torch.dtype, seed: int = 0) -> Int4Linear:
    torch.manual_seed(seed)
    return Int4Linear(nn.Linear(256, 128, bias=False), 64, ComputeChoice(dtype, "triton", "test"))


def test_a_layer_holds_and_serves_the_words_only_with_the_switch(monkeypatch):
    """With the switch a 16-bit layer holds the words instead of the split scales and zeros (both where the small-rows
    GEMV runs, which reads them split); a decode-sized step (the GEMM) and a prefill-sized one (dequantize, then
    cuBLAS: model_server/int4_dequant.py) give the same bits either way."""
    xs = [(torch.randn(2, 20, 256) * 0.5).half(), (torch.randn(330, 256) * 0.5).half()]
    assert _layer(torch.float16).step_kernel(330) == "triton-dequant"
    outs = {}
    for value in ("", "0", "1"):
        set_switch(monkeypatch, cfgmod.PAIRED_SWITCH, value, cfgmod.paired_scales_on)
        layer = _layer(torch.float16)
        held = dict(layer.named_buffers())
        assert ("triton_paired" in held) is (value == "1") and ("triton_scales" in held) is (value != "1")
        assert "triton_paired" not in dict(_layer(torch.float32).named_buffers())   # 32-bit: no words
        with torch.inference_mode():
            outs[value] = [layer(x) for x in xs]
    for got, want in zip(outs["1"] + outs[""], outs["0"] * 2):
        assert torch.equal(got, want)
    set_switch(monkeypatch, cfgmod.PAIRED_SWITCH, "1", cfgmod.paired_scales_on)
    torch.manual_seed(0)
    gemv = Int4Linear(nn.Linear(256, 128, bias=False), 64, ComputeChoice(torch.float16, "triton", "t", rows_kernel="gemv"))
    assert {"triton_paired", "triton_scales", "triton_zeros"} <= set(dict(gemv.named_buffers()))
    set_switch(monkeypatch, cfgmod.PAIRED_SWITCH, "yes", cfgmod.paired_scales_on)
    with pytest.raises(SwitchValueError, match=cfgmod.PAIRED_SWITCH):           # at load, not at the first step
        _layer(torch.float16)


def test_a_merged_layer_joins_the_words(monkeypatch):
    set_switch(monkeypatch, cfgmod.PAIRED_SWITCH, "1", cfgmod.paired_scales_on)
    parts = [_layer(torch.float16, seed) for seed in (1, 2)]
    both = merge(parts)
    assert both is not None
    assert torch.equal(both.fn.triton_paired, torch.cat([p.triton_paired for p in parts], dim=1))
    x = (torch.randn(20, 256) * 0.5).half()
    with torch.inference_mode():
        for got, part in zip(both(x), parts):
            assert torch.equal(got, part(x))


def test_the_gpu_check_runs_its_bit_checks_on_cpu(tmp_path):
    """benchmarks/int4_paired_check.py (the GPU call's bit and time check) as a dry run in the interpreter: every row
    count, plain and GLU, gives the same bits both ways, and the step sums (GPU only) are empty."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "benchmarks/int4_paired_check.py", "--out", str(tmp_path), "--device", "cpu",
                        "--shapes", "256,128", "--ms", "24,70"], cwd=Path(__file__).resolve().parents[1], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().endswith("4 of 4 cases give the same bits both ways")
    res = json.loads((tmp_path / "int4_paired_check.json").read_text())
    assert [(row["shape"], row["m"], row["differ"]) for row in res["rows"]] == [
        ("256x128", 24, 0), ("256x128+glu", 24, 0), ("256x128", 70, 0), ("256x128+glu", 70, 0)]
    assert res["step_us"] == {}


def test_the_precompile_launches_the_gemm_on_what_serving_reads(monkeypatch):
    """model_server/int4_precompile.py compiles the variants serving launches: with the words held, every precompile
    launch of the GEMM and of the prefill pass gets the paired int32 words (separate Triton compiles, PAIRED), never
    split scales; without them, the split scales."""
    from model_server import int4_dequant, int4_precompile
    monkeypatch.setenv("MODEL_SERVER_INT4_PREFILL_DEQUANT_ROWS", "0")
    int4_dequant.min_rows.cache_clear()
    seen = []
    real = int4_triton.int4_triton_mm

    def spy(x, packed, scales, zeros, group, config=None):
        seen.append(scales.dtype)
        return real(x, packed, scales, zeros, group, config=config)

    real_dequant = int4_dequant.dequantize

    def spy_dequant(packed, scales, zeros, group, dtype):
        seen.append(("dequant", scales.dtype))
        return real_dequant(packed, scales, zeros, group, dtype)

    monkeypatch.setattr(int4_triton, "int4_triton_mm", spy)
    monkeypatch.setattr(int4_dequant, "dequantize", spy_dequant)
    for value, want in (("1", torch.int32), ("0", torch.float16)):
        set_switch(monkeypatch, cfgmod.PAIRED_SWITCH, value, cfgmod.paired_scales_on)
        seen.clear()
        layer = Int4Linear(nn.Linear(128, 64, bias=False), 64, ComputeChoice(torch.float16, "triton", "test"))
        assert int4_precompile.precompile([layer], max_rows=40) > 0
        assert seen and set(seen) == {want}                        # the GEMM's variants, every row count on it
        monkeypatch.setenv("MODEL_SERVER_INT4_PREFILL_DEQUANT_ROWS", "32")
        int4_dequant.min_rows.cache_clear()
        seen.clear()
        assert int4_precompile.precompile([layer], max_rows=40) > 0
        assert ("dequant", want) in seen and set(seen) == {want, ("dequant", want)}   # and the prefill pass
        monkeypatch.setenv("MODEL_SERVER_INT4_PREFILL_DEQUANT_ROWS", "0")
        int4_dequant.min_rows.cache_clear()
    int4_dequant.min_rows.cache_clear()
