"""The multi-row bf16 GEMV's logic on CPU (model_server/gemv_bf16.py, ``GemvConfig.rows`` 2..8): the configurations
and their choice per (rows, n, k), ``MODEL_SERVER_FAST_GEMV_ROWS``, the patched forward's routing by row count (with
a stand-in for the CUDA kernel), and :func:`gemv_bf16.emulate` (the kernel's arithmetic in PyTorch) against a line by
line transcription of the kernel's loops and against fp32. The kernel itself compiles in
tests/test_gemv_bf16_nvrtc.py; its numbers are ``benchmarks/gemv_bf16_bench.py --rows``'s (on a GPU)."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from model_server import gemv_bf16

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gemv_bf16_bench  # noqa: E402


def test_one_row_names_are_unchanged_and_every_row_count_has_configs() -> None:
    assert gemv_bf16.GemvConfig(1, 8, 4).name() == "gemv_bf16<1, 8, 4>"       # the measured kernel's name (cache key)
    assert gemv_bf16.GemvConfig(2, 8, 2, 8).name() == "gemv_bf16<2, 8, 2, 8>"
    assert len(set(gemv_bf16.CONFIGS)) == len(gemv_bf16.CONFIGS)
    assert {c.rows for c in gemv_bf16.CONFIGS} == set(range(1, gemv_bf16.MAX_ROWS + 1))
    assert all(c.unroll % 2 == 0 for c in gemv_bf16.CONFIGS)               # emulate(): a row's bits whatever the config
    assert sum(c.rows == 1 for c in gemv_bf16.CONFIGS) == 12                # the twelve measured on 2026-12-06


@pytest.mark.parametrize("rows", range(1, gemv_bf16.MAX_ROWS + 1))
def test_choose_returns_a_listed_config_for_that_many_rows(rows: int) -> None:
    for n, k in [*gemv_bf16_bench.SHAPES.values(), (77, 136), (7, 8)]:
        cfg = gemv_bf16.choose(n, k, rows)
        assert cfg in gemv_bf16.CONFIGS and cfg.rows == rows
    assert gemv_bf16.choose(3072, 2048) == gemv_bf16.GemvConfig(1, 8, 4)    # one row: as measured


def test_choose_rejects_row_counts_it_has_no_kernel_for() -> None:
    for rows in (0, gemv_bf16.MAX_ROWS + 1):
        with pytest.raises(ValueError):
            gemv_bf16.choose(3072, 2048, rows)


def test_the_rows_switch(monkeypatch) -> None:
    from model_server.engines.fast import factory
    from model_server.switches import SwitchValueError
    monkeypatch.delenv("MODEL_SERVER_FAST_GEMV_ROWS", raising=False)
    assert factory.gemv_rows_switch() == 1                # unset: one-row steps only (as measured)
    for value in ("1", "2", "8", " 4 "):
        monkeypatch.setenv("MODEL_SERVER_FAST_GEMV_ROWS", value)
        assert factory.gemv_rows_switch() == int(value)
    for value in ("0", "9", "-1", "two", "2.5"):
        monkeypatch.setenv("MODEL_SERVER_FAST_GEMV_ROWS", value)
        with pytest.raises(SwitchValueError, match="MODEL_SERVER_FAST_GEMV_ROWS") as err:
            factory.gemv_rows_switch()
        assert "\n" not in str(err.value)


def test_from_loaded_rejects_a_bad_rows_switch_even_with_the_gemv_off(monkeypatch) -> None:
    from types import SimpleNamespace

    from model_server.engines.fast import factory
    from model_server.switches import SwitchValueError
    from tests.fast_engine_support import _tiny
    loaded = SimpleNamespace(model=_tiny("llama"), eos_token_ids=[0], context_length=64)
    monkeypatch.setenv("MODEL_SERVER_FAST_GEMV", "0")
    monkeypatch.setenv("MODEL_SERVER_FAST_GEMV_ROWS", "16")
    with pytest.raises(SwitchValueError):
        factory.from_loaded(loaded, max_batch=2, max_total_tokens=32)


@pytest.mark.parametrize("max_rows", [1, 2, 8])
def test_install_routes_up_to_max_rows(monkeypatch, max_rows: int) -> None:
    calls: list[tuple[int, ...]] = []

    def stand_in(x: torch.Tensor, w: torch.Tensor, cfg=None) -> torch.Tensor:
        calls.append(tuple(x.shape))
        return F.linear(x, w)

    monkeypatch.setattr(gemv_bf16, "usable", lambda w: True)
    monkeypatch.setattr(gemv_bf16, "gemv", stand_in)
    lin = nn.Linear(16, 8, bias=False).to(torch.bfloat16)
    model = nn.Sequential(lin, nn.Linear(8, 4))                      # the biased one is not eligible
    assert gemv_bf16.install(model, max_rows) == 1
    for rows in range(1, 11):
        for shape in ((rows, 16), (rows, 1, 16)):
            x = torch.randn(*shape, dtype=torch.bfloat16)
            calls.clear()
            assert torch.equal(lin(x), F.linear(x, lin.weight))
            assert calls == ([shape] if rows <= max_rows else []), (rows, shape)   # above max_rows: F.linear
    calls.clear()
    with pytest.raises(RuntimeError):
        lin(torch.randn(1, 16))                                      # fp32 input: F.linear (refuses bf16 w)
    lin(torch.randn(0, 16, dtype=torch.bfloat16))                    # no rows: F.linear
    assert calls == []


def test_install_rejects_a_max_rows_without_kernels() -> None:
    with pytest.raises(ValueError):
        gemv_bf16.install(nn.Sequential(), gemv_bf16.MAX_ROWS + 1)


def test_check_cases_add_multi_row_shapes_only_when_asked() -> None:
    assert {r for r, _, _ in gemv_bf16.check_cases()} == {1}        # the default: one row, as at a cold start today
    assert {r for r, _, _ in gemv_bf16.check_cases(8)} == {1, 2, 4, 8}
    assert {r for r, _, _ in gemv_bf16.check_cases(5)} == {1, 2, 4, 5}


def kernel_by_hand(x: np.ndarray, w: np.ndarray, unroll: int) -> np.ndarray:
    """The .cu file's loops transcribed for one warp per output (fp32 numpy scalars; exact products, as fmaf's)."""
    rows, k = x.shape
    n, kc = w.shape[0], k // 8
    y = np.zeros((rows, n), dtype=np.float32)
    for q in range(rows):
        for r in range(n):
            lanes = []
            for lane in range(32):
                acc = [np.float32(0), np.float32(0)]
                for c0 in range(lane, kc, 32 * unroll):
                    for u in range(unroll):
                        c = c0 + 32 * u
                        if c < kc:
                            for e in range(8):
                                acc[u & 1] = np.float32(acc[u & 1] + np.float32(w[r, 8 * c + e] * x[q, 8 * c + e]))
                lanes.append(np.float32(acc[0] + acc[1]))
            for o in (16, 8, 4, 2, 1):
                lanes = [np.float32(lanes[i] + lanes[i ^ o]) for i in range(32)]
            y[q, r] = lanes[0]
    return y


@pytest.mark.parametrize("unroll", [2, 4])
def test_emulate_matches_the_kernels_loops_bit_for_bit(unroll: int) -> None:
    gen = torch.Generator().manual_seed(0)
    for rows, n, k in ((3, 4, 560), (2, 3, 2056), (1, 2, 8)):      # K not a whole number of 32 x unroll chunks
        x = torch.randn(rows, k, generator=gen).to(torch.bfloat16)
        w = (torch.randn(n, k, generator=gen) * 0.05).to(torch.bfloat16)
        by_hand = torch.from_numpy(kernel_by_hand(x.float().numpy(), w.float().numpy(), unroll))
        assert torch.equal(gemv_bf16.emulate(x, w, unroll, rounded=False), by_hand), (rows, n, k)    # fp32 bits
        assert torch.equal(gemv_bf16.emulate(x, w, unroll), by_hand.to(torch.bfloat16))


def test_emulate_is_within_bf16_rounding_of_fp32_and_the_same_for_every_even_unroll() -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(8, 2048, generator=gen).to(torch.bfloat16)
    w = (torch.randn(96, 2048, generator=gen) * 0.05).to(torch.bfloat16)
    ref = x.float() @ w.float().T
    y = gemv_bf16.emulate(x, w, 4)
    assert float((y.float() - ref).abs().max() / ref.abs().max()) < 1e-2
    assert torch.equal(y, gemv_bf16.emulate(x, w, 2)) and torch.equal(y, gemv_bf16.emulate(x, w, 8))
    assert torch.equal(y[3:4], gemv_bf16.emulate(x[3:4], w, 4))    # a row's bits do not depend on the other rows


def test_bench_arguments_and_step_table() -> None:
    args = gemv_bf16_bench.parse_args(["--out", "o", "--rows", "1,2,4,8,2"])
    assert args.rows == [1, 2, 4, 8] and gemv_bf16_bench.parse_args(["--out", "o"]).rows == [1]
    for bad in ("0", "9", "x", ""):
        with pytest.raises(SystemExit):
            gemv_bf16_bench.parse_args(["--out", "o", "--rows", bad])
    with pytest.raises(SystemExit):
        gemv_bf16_bench.parse_args(["--out", "o", "--shapes", "qkv_proj,nope"])
    table = gemv_bf16_bench.step_table({1: {"cublas": 1078.3, "default": 960.9, "best": 950.0},
                                        8: {"cublas": 1250.0, "default": 1057.0, "best": 1000.0}})
    lines = table.splitlines()
    assert len(lines) == 4 and lines[2].startswith("1 | 1078.3 | 960.9 | 950.0 | 1.00")
    assert lines[3] == "8 | 1250.0 | 1057.0 | 1000.0 | 1.10"
