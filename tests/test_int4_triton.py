"""The INT4 Triton kernels (model_server/int4_triton.py, the small-rows int4_gemv.py) and Int4Linear's dispatch by rows,
in Triton's CPU interpreter.

The interpreter runs the same kernel source a GPU compiles (fp32 and fp16 activations; it cannot bit-cast to
bf16, which the GPU benchmark checks against a float32 reference every run: benchmarks/int4_kernels.py).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from model_server import int4, int4_choice, int4_gemv, int4_triton
from model_server.engines.fast.merged import merge
from model_server.int4 import (AUTO_MODE, GEMV_MAX_ROWS, TINYGEMM_MAX_ROWS, ComputeChoice, Int4Linear, choose_compute,
                               device_compute)
from model_server.int4_quant import dequantize_groupwise, quantize_groupwise
from model_server.weights import measure_weight_bytes
from tests.int4_triton_support import interpreter, reference, rel  # noqa: F401 (interpreter: an autouse fixture)




@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 3e-3)])
@pytest.mark.parametrize("m", [1, 9, 70])
@pytest.mark.parametrize("group", [32, 128])
def test_kernel_computes_x_times_the_dequantized_weight(dtype, tol, m, group):
    torch.manual_seed(m + group)
    n, k = 96, 512
    q, sz = quantize_groupwise(torch.randn(n, k) * 0.05, group)
    x = torch.randn(m, k)
    packed = int4_triton.pack_int4(q, group)
    scales, zeros = int4_triton.split_scales_and_zeros(sz)
    y = int4_triton.int4_triton_mm(x.to(dtype), packed, scales, zeros, group)
    assert y.shape == (m, n) and y.dtype == dtype and torch.isfinite(y).all()
    assert rel(y, reference(x, q, sz, group)) < tol


@pytest.mark.parametrize("swap_ab,fold,split", [(True, True, 2), (True, False, 4), (False, True, 1), (False, False, 2)])
def test_every_launch_configuration_computes_the_same_product(swap_ab, fold, split):
    torch.manual_seed(7)
    n, k, group = 80, 512, 64            # N not a multiple of BLOCK_N: the masked edge tile is checked too
    q, sz = quantize_groupwise(torch.randn(n, k) * 0.05, group)
    x = torch.randn(20, k)
    cfg = int4_triton.Config(16, 64, split, 2, 4, swap_ab, fold)
    y = int4_triton.int4_triton_mm(x.half(), int4_triton.pack_int4(q, group), *int4_triton.split_scales_and_zeros(sz),
                                   group, cfg)
    assert rel(y, reference(x, q, sz, group)) < 3e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("swap_ab,split", [(True, 1), (True, 4), (False, 2)])
def test_dequantizing_with_one_fma_in_the_activation_dtype_rounds_each_weight_once(dtype, swap_ab, split):
    torch.manual_seed(11)
    n, k, group, m = 80, 512, 64, 20
    q, sz = quantize_groupwise(torch.randn(n, k) * 0.05, group)
    sz = sz.to(dtype).float()                        # the scales and zeros as the layer holds them (activation dtype)
    x = torch.randn(m, k).to(dtype)
    packed, (scales, zeros) = int4_triton.pack_int4(q, group), int4_triton.split_scales_and_zeros(sz.to(dtype))
    cfg = int4_triton.Config(16, 64, split, 2, 4, swap_ab, False, True)
    y = int4_triton.int4_triton_mm(x, packed, scales, zeros, group, cfg)
    w = dequantize_groupwise(q, sz, group).to(dtype)                # each weight rounded once to the dtype
    want = x.double() @ w.double().t()
    assert rel(y, want) < (1e-6 if dtype == torch.float32 else 1e-3)
    y32 = int4_triton.int4_triton_mm(x, packed, scales, zeros, group, int4_triton.Config(16, 64, split, 2, 4, swap_ab,
                                                                                        False, False))
    assert rel(y, y32.double()) < (1e-6 if dtype == torch.float32 else 2e-3)


def test_config_choice_splits_k_only_while_tiles_do_not_fill_the_device():
    small = int4_triton.choose_config(1, 2048, 2048, 128, 132)
    wide = int4_triton.choose_config(1, 128256, 2048, 128, 132)
    big = int4_triton.choose_config(256, 8192, 2048, 128, 132)
    assert small.split_k > 1 and small.swap_ab
    assert wide.split_k == 1
    assert big.split_k == 1 and not big.swap_ab and big.block_m in (64, 128)
    assert 16 // small.split_k >= 2          # every split gets at least two K-blocks
    # dequantize at every row count (the H200 sweep: 5-12 % faster than folding at 1-16 rows on 4 of 5 shapes)
    assert not any(int4_triton.choose_config(m, n, 2048, 128, 132).fold for m in (1, 8, 16, 64, 256)
                   for n in (2048, 16384, 128256))


def test_bad_shapes_are_one_line_errors():
    q, sz = quantize_groupwise(torch.randn(32, 256), 128)
    packed = int4_triton.pack_int4(q, 128)
    scales, zeros = int4_triton.split_scales_and_zeros(sz)
    with pytest.raises(ValueError, match="do not match group"):
        int4_triton.int4_triton_mm(torch.randn(2, 128), packed, scales, zeros, 128)
    with pytest.raises(ValueError, match="power of two"):
        int4_triton.block_k(48)
    with pytest.raises(ValueError, match="does not divide"):
        int4_triton.int4_triton_mm(torch.randn(2, 256), packed, scales, zeros, 128,
                                   int4_triton.Config(16, 64, 4, 2, 4, True, True))
    assert int4_triton.int4_triton_mm(torch.randn(0, 256), packed, scales, zeros, 128).shape == (0, 32)


def _gemv(x: torch.Tensor, q: torch.Tensor, sz: torch.Tensor, group: int, cfg=None) -> torch.Tensor:
    return int4_gemv.int4_gemv_mm(x, int4_triton.pack_int4(q, group), *int4_triton.split_scales_and_zeros(sz), group,
                                  cfg)


# (rows, N, K, group, config): N not a multiple of BLOCK_N (masked columns), K-blocks not a multiple of
# NB x split (masked K-blocks), split K on and off, CUDA cores and tensor cores, group 32 (BLOCK_K 32) to 256
# (two K-blocks per group).
GEMV_CASES = [
    (1, 96, 512, 128, int4_gemv.GemvConfig(16, 2, 1, 1, 2, 4, False)),
    (1, 72, 640, 64, int4_gemv.GemvConfig(32, 4, 1, 2, 3, 4, False)),
    (3, 80, 640, 64, int4_gemv.GemvConfig(32, 4, 4, 2, 3, 4, False)),
    (3, 80, 640, 64, int4_gemv.GemvConfig(32, 2, 16, 2, 3, 4, True)),
    (8, 48, 768, 256, int4_gemv.GemvConfig(16, 4, 8, 1, 3, 4, False)),
    (8, 100, 512, 32, int4_gemv.GemvConfig(32, 2, 16, 4, 3, 4, True)),
    (16, 100, 1024, 256, int4_gemv.GemvConfig(16, 1, 16, 4, 3, 4, True)),
    (16, 64, 384, 128, int4_gemv.GemvConfig(64, 1, 16, 1, 2, 4, True)),
    (2, 40, 640, 64, int4_gemv.GemvConfig(16, 4, 16, 2, 3, 4, True, False)),          # scales loaded in the iteration
    (1, 40, 640, 64, int4_gemv.GemvConfig(16, 4, 1, 2, 3, 4, False, False)),
]


@pytest.mark.parametrize("m,n,k,group,cfg", GEMV_CASES)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 3e-3)])
def test_gemv_kernel_computes_x_times_the_dequantized_weight(m, n, k, group, cfg, dtype, tol):
    torch.manual_seed(m * 7 + n + k)
    q, sz = quantize_groupwise(torch.randn(n, k) * 0.05, group)
    x = torch.randn(m, k)
    y = _gemv(x.to(dtype), q, sz, group, cfg)
    assert y.shape == (m, n) and y.dtype == dtype and torch.isfinite(y).all()
    assert rel(y, reference(x, q, sz, group)) < tol


@pytest.mark.parametrize("m", [1, 3, 8, 16])
def test_gemv_default_config_for_each_row_count(m):
    torch.manual_seed(m)
    q, sz = quantize_groupwise(torch.randn(40, 256) * 0.05, 64)
    x = torch.randn(m, 256)
    cfg = int4_gemv.choose_gemv_config(m, 40, 256, 64, 8)
    assert cfg.block_m >= m and (not cfg.dot or cfg.block_m >= 16)
    assert rel(_gemv(x, q, sz, 64), reference(x, q, sz, 64)) < 1e-5


def test_gemv_config_uses_the_tuned_table_for_its_rows_bucket(monkeypatch):
    tuned = int4_gemv.GemvConfig(64, 2, 8, 2, 3, 8, False)
    monkeypatch.setitem(int4_gemv.TUNED, (8, 2048, 8192), tuned)
    assert [int4_gemv.rows_bucket(m) for m in (1, 2, 8, 9, 16, 17, 64)] == [1, 8, 8, 16, 16, 64, 64]
    assert int4_gemv.choose_gemv_config(5, 2048, 8192, 128, 132) == tuned
    assert int4_gemv.choose_gemv_config(1, 2048, 8192, 128, 132) != tuned       # another bucket: the rule
    rule = int4_gemv.choose_gemv_config(1, 2048, 8192, 128, 132)
    assert rule.block_m == 1 and not rule.dot and rule.split > 1           # 128 strips: split K fills the SMs


def test_gemv_rejects_rows_past_its_block_and_bad_shapes():
    q, sz = quantize_groupwise(torch.randn(32, 256), 128)
    with pytest.raises(ValueError, match="do not fit block_m"):
        _gemv(torch.randn(5, 256), q, sz, 128, int4_gemv.GemvConfig(16, 2, 4, 1, 2, 4, False))
    with pytest.raises(ValueError, match="do not fit block_m"):
        _gemv(torch.randn(2, 256), q, sz, 128, int4_gemv.GemvConfig(16, 2, 8, 1, 2, 4, True))
    with pytest.raises(ValueError, match="do not match group"):
        _gemv(torch.randn(2, 128), q, sz, 128)
    assert _gemv(torch.randn(0, 256), q, sz, 128).shape == (0, 32)


def _calls(monkeypatch, module=int4_triton, name: str = "int4_triton_mm") -> list[int]:
    seen: list[int] = []
    real = getattr(module, name)

    def spy(x, *a, **kw):
        seen.append(x.shape[0])
        return real(x, *a, **kw)
    monkeypatch.setattr(module, name, spy)
    return seen


def test_int4_linear_runs_tinygemm_up_to_eight_rows_and_triton_above(monkeypatch):
    torch.manual_seed(1)
    lin = nn.Linear(256, 64, bias=True)
    q, sz = quantize_groupwise(lin.weight, 64)
    mod = Int4Linear(lin, 64, ComputeChoice(torch.float32, "cpu-int4pack", "test", rows_kernel="triton"))
    seen = _calls(monkeypatch)
    for rows in (1, TINYGEMM_MAX_ROWS, TINYGEMM_MAX_ROWS + 1, 40):
        x = torch.randn(rows, 256)
        want = reference(x, q, sz.float(), 64) + lin.bias.detach().double()
        with torch.inference_mode():
            assert rel(mod(x), want) < 1e-4
    assert seen == [TINYGEMM_MAX_ROWS + 1, 40]


def test_a_wide_layer_leaves_tinygemm_sooner(monkeypatch):
    """int4pack's time grows with the rows the faster the wider the layer (H200 sweep: it crosses the Triton GEMM near
    3.4 rows on the LM head, 5.6 on gate/up), so wide layers run Triton from fewer rows; the report's "dispatch"
    column follows."""
    assert [int4.tinygemm_max_rows(n) for n in (128256, 16384, 8192, 3072)] == [3, 5, TINYGEMM_MAX_ROWS, TINYGEMM_MAX_ROWS]
    monkeypatch.setattr(int4_choice, "WIDE_LAYERS", ((64, 3),))   # make this small layer "wide"
    torch.manual_seed(2)
    lin = nn.Linear(256, 64, bias=False)
    q, sz = quantize_groupwise(lin.weight, 64)
    mod = Int4Linear(lin, 64, ComputeChoice(torch.float32, "cpu-int4pack", "test", rows_kernel="triton"))
    assert "above 3 rows=triton" in mod.extra_repr()
    seen = _calls(monkeypatch)
    for rows in (1, 3, 4, 8, 9):
        x = torch.randn(rows, 256)
        with torch.inference_mode():
            assert rel(mod(x), reference(x, q, sz.float(), 64)) < 1e-4
    assert seen == [4, 8, 9]
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from int4_kernels import dispatch_method
    pick = dispatch_method((9, 0))
    assert [pick(m, 64) for m in (3, 4)] == ["tinygemm", "triton"] and pick(8, 63) == "tinygemm"


def test_int4_linear_triton_mode_runs_the_small_rows_kernel_up_to_its_rows_and_the_gemm_above(monkeypatch):
    torch.manual_seed(4)
    lin = nn.Linear(256, 48, bias=True)
    q, sz = quantize_groupwise(lin.weight, 64)
    mod = Int4Linear(lin, 64, ComputeChoice(torch.float32, "triton", "test", rows_kernel="gemv"))
    assert not hasattr(mod, "weight_packed") and "gemv" in mod.extra_repr()
    gemv, gemm = _calls(monkeypatch, int4_gemv, "int4_gemv_mm"), _calls(monkeypatch)
    for rows in (1, 5, GEMV_MAX_ROWS, GEMV_MAX_ROWS + 1):
        x = torch.randn(rows, 256)
        want = reference(x, q, sz.float(), 64) + lin.bias.detach().double()
        with torch.inference_mode():
            assert rel(mod(x), want) < 1e-4
    assert gemv == [1, 5, GEMV_MAX_ROWS] and gemm == [GEMV_MAX_ROWS + 1]


def test_triton_only_keeps_one_layout_and_fewer_bytes():
    torch.manual_seed(2)
    lin = nn.Linear(256, 64, bias=False)
    both = Int4Linear(lin, 64, ComputeChoice(torch.float16, "cpu-int4pack", "t", rows_kernel="triton"))
    only = Int4Linear(lin, 64, ComputeChoice(torch.float16, "triton", "t"))
    assert not hasattr(only, "weight_packed") and hasattr(both, "weight_packed")
    assert measure_weight_bytes(only) < measure_weight_bytes(both)
    x = torch.randn(3, 256)
    q, sz = quantize_groupwise(lin.weight, 64)
    assert rel(only(x.half()), reference(x, q, sz, 64)) < 3e-3


@pytest.mark.parametrize("kernel,rows_kernel", [("cpu-int4pack", "triton"), ("triton", "gemv")])
def test_merged_projection_with_both_kernels_matches_its_parts(kernel, rows_kernel):
    torch.manual_seed(3)
    choice = ComputeChoice(torch.float32, kernel, "t", rows_kernel=rows_kernel)
    parts = [Int4Linear(nn.Linear(256, n, bias=False), 64, choice) for n in (64, 32, 32)]
    with torch.inference_mode():
        merged = merge(parts)
        assert merged is not None
        for rows in (2, 24):
            x = torch.randn(rows, 256)
            want = [p(x) for p in parts]
            got = merged(x)
            for g, w in zip(got, want):
                assert rel(g, w.double()) < 1e-5
    ptr = merged.fn.triton_packed.untyped_storage().data_ptr()
    assert all(p.triton_packed.untyped_storage().data_ptr() == ptr for p in parts)   # views, not copies


def test_compute_choice_with_and_without_triton(monkeypatch):
    auto = choose_compute("cuda", (9, 0), triton=True)
    assert auto == choose_compute("cuda", (9, 0), triton=True, mode=AUTO_MODE)
    assert choose_compute("cuda", (9, 0), triton=False).int4_kernel == "cuda-int4pack"
    assert choose_compute("cuda", (9, 0), triton=False).rows_kernel is None
    assert choose_compute("cuda", (9, 0), triton=True, mode="tinygemm").rows_kernel is None
    mixed = choose_compute("cuda", (9, 0), triton=True, mode="mixed")
    assert (mixed.int4_kernel, mixed.rows_kernel) == ("cuda-int4pack", "triton")
    gemm = choose_compute("cuda", (8, 0), triton=True, mode="triton-gemm")
    assert (gemm.int4_kernel, gemm.rows_kernel) == ("triton", None)
    only = choose_compute("cuda", (8, 0), triton=True, mode="triton")
    assert (only.int4_kernel, only.rows_kernel) == ("triton", "gemv")
    t4 = choose_compute("cuda", (7, 5), triton=True)             # T4: fp16 + dequantize, no Triton dispatch
    assert (t4.dtype, t4.int4_kernel, t4.rows_kernel) == (torch.float16, "dequant", None)
    for mode in ("triton", "mixed", "triton-gemm"):
        with pytest.raises(ValueError, match="not importable"):
            choose_compute("cuda", (9, 0), triton=False, mode=mode)
    monkeypatch.setenv("MODEL_SERVER_INT4_KERNELS", "fastest")
    with pytest.raises(ValueError, match="must be one of auto, tinygemm, triton, mixed, triton-gemm") as err:
        device_compute("cpu")
    assert "\n" not in str(err.value)
