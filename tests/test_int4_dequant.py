"""Prefill-sized INT4 steps as a dequantization pass then a GEMM (model_server/int4_dequant.py), in Triton's CPU
interpreter: the kernel writes exactly the reference's weights, the product matches, the row bound's switch, and
which steps take the path (int4_choice.step_kernel, Int4Linear, int4_precompile)."""
from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
from torch import nn

from model_server import int4_dequant, int4_precompile, int4_triton
from model_server.int4 import ComputeChoice, Int4Linear, step_kernel
from model_server.int4_quant import dequantize_groupwise, quantize_groupwise
from model_server.switches import SwitchValueError
from tests.int4_triton_support import interpreter, reference, rel  # noqa: F401 (interpreter: an autouse fixture)


@pytest.fixture(autouse=True)
def _fresh_bound():
    int4_dequant.min_rows.cache_clear()
    yield
    int4_dequant.min_rows.cache_clear()


@contextmanager
def _bound(monkeypatch, value: str | None):
    if value is None:
        monkeypatch.delenv(int4_dequant.ROWS_SWITCH, raising=False)
    else:
        monkeypatch.setenv(int4_dequant.ROWS_SWITCH, value)
    int4_dequant.min_rows.cache_clear()
    yield
    int4_dequant.min_rows.cache_clear()


def _layer(n: int, k: int, group: int, seed: int):
    torch.manual_seed(seed)
    q, sz = quantize_groupwise(torch.randn(n, k) * 0.05, group)
    return q, sz, int4_triton.pack_int4(q, group), *int4_triton.split_scales_and_zeros(sz)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n,k,group", [(80, 512, 64), (96, 256, 128), (64, 512, 32), (200, 1024, 256)])
def test_the_kernel_writes_the_reference_weights_rounded_once(n, k, group, dtype):
    """N not a multiple of the 64-row block (80, 200: the masked edge), every group size the layout takes."""
    q, sz, packed, scales, zeros = _layer(n, k, group, n + k)
    w = int4_dequant.dequantize(packed, scales, zeros, group, dtype)
    assert w.shape == (n, k) and w.dtype == dtype
    assert torch.equal(w, dequantize_groupwise(q, sz, group).to(dtype))


def test_the_product_is_x_times_the_dequantized_weight():
    q, sz, packed, scales, zeros = _layer(96, 512, 64, 3)
    x = torch.randn(300, 512)
    got = int4_dequant.int4_dequant_mm(x, packed, scales, zeros, 64)
    assert got.shape == (300, 96) and rel(got, reference(x, q, sz, 64)) < 1e-6


def test_mismatched_shapes_are_one_line_errors():
    _, _, packed, scales, zeros = _layer(64, 256, 64, 4)
    with pytest.raises(ValueError, match="does not match packed"):
        int4_dequant.int4_dequant_mm(torch.randn(3, 128), packed, scales, zeros, 64)
    with pytest.raises(ValueError, match="do not match group 128"):
        int4_dequant.dequantize(packed, scales, zeros, 128, torch.float32)


def test_the_row_bound_switch(monkeypatch):
    with _bound(monkeypatch, None):
        assert int4_dequant.min_rows() == int4_dequant.DEFAULT_MIN_ROWS == 320
        assert int4_dequant.takes(320) and not int4_dequant.takes(319)
    with _bound(monkeypatch, "0"):
        assert not int4_dequant.takes(100_000)
    with _bound(monkeypatch, "65"):
        assert int4_dequant.takes(65) and not int4_dequant.takes(64)
    for bad in ("-1", "lots"):
        with _bound(monkeypatch, bad), pytest.raises(SwitchValueError, match=int4_dequant.ROWS_SWITCH):
            int4_dequant.min_rows()


@pytest.mark.parametrize("kernel,rows_kernel", [("triton", "gemv"), ("mma", None), ("cuda-int4pack", "triton"),
                                                ("triton", None)])
def test_steps_that_would_run_the_gemm_take_the_path_from_the_bound(monkeypatch, kernel, rows_kernel):
    with _bound(monkeypatch, None):
        assert step_kernel(kernel, rows_kernel, 319, 2048) == "triton"
        assert step_kernel(kernel, rows_kernel, 320, 2048) == "triton-dequant"
        assert step_kernel(kernel, rows_kernel, 4096, 128256) == "triton-dequant"
    with _bound(monkeypatch, "0"):
        assert step_kernel(kernel, rows_kernel, 4096, 2048) == "triton"


def test_a_layer_without_the_triton_layout_never_takes_it(monkeypatch):
    with _bound(monkeypatch, "1"):
        assert step_kernel("cuda-int4pack", None, 4096, 2048) == "cuda-int4pack"
        assert step_kernel("tinygemm", None, 4096, 2048) == "tinygemm"


def test_int4_linear_dispatches_prefill_rows_to_it_with_the_same_output(monkeypatch):
    """300 rows: the dequantize-then-GEMM path (the spy sees it) against the fused GEMM (switch off), fp32."""
    torch.manual_seed(5)
    mod = Int4Linear(nn.Linear(256, 80, bias=True), 64, ComputeChoice(torch.float32, "triton", "test"))
    x = torch.randn(2, 150, 256)
    with _bound(monkeypatch, "0"):
        fused = mod(x)
    seen = []
    real = int4_dequant.int4_dequant_mm
    monkeypatch.setattr(int4_dequant, "int4_dequant_mm", lambda *a: seen.append(a[0].shape) or real(*a))
    with _bound(monkeypatch, "256"):
        got = mod(x)
        mod(x[:, :100])                                    # 200 rows: the GEMM
    assert seen == [(300, 256)]
    assert got.shape == fused.shape and rel(got, fused) < 1e-5


def test_a_bad_bound_fails_the_load(monkeypatch):
    with _bound(monkeypatch, "many"), pytest.raises(SwitchValueError, match=int4_dequant.ROWS_SWITCH):
        Int4Linear(nn.Linear(128, 64), 64, ComputeChoice(torch.float32, "triton", "test"))


def test_precompile_runs_the_dequantization_once_per_shape_and_no_gemm_variant_above_the_bound(monkeypatch):
    deq, gemm = [], []
    real_deq, real_mm = int4_dequant.dequantize, int4_triton.int4_triton_mm
    monkeypatch.setattr(int4_dequant, "dequantize", lambda p, *a: deq.append(tuple(p.shape)) or real_deq(p, *a))
    monkeypatch.setattr(int4_triton, "int4_triton_mm",
                        lambda x, *a, config=None: gemm.append(x.shape[0]) or real_mm(x, *a, config=config))
    torch.manual_seed(0)
    choice = ComputeChoice(torch.float32, "cpu-int4pack", "test", rows_kernel="triton")
    a, b = (Int4Linear(nn.Linear(128, 64, bias=False), 64, choice) for _ in range(2))
    c = Int4Linear(nn.Linear(256, 32, bias=False), 64, choice)
    with _bound(monkeypatch, "100"):
        n = int4_precompile.precompile([nn.Sequential(a, b), c], max_rows=300)
    assert sorted(deq) == sorted([tuple(a.triton_packed.shape), tuple(c.triton_packed.shape)])
    assert gemm and max(gemm) < 100 and n == len(deq) + len(gemm)
    deq.clear()
    with _bound(monkeypatch, "400"):                        # steps of 300 rows never reach the bound
        int4_precompile.precompile([c], max_rows=300)
    assert deq == []
