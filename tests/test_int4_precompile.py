"""Every INT4 Triton GEMM variant a model can launch, compiled once (model_server/int4_precompile.py): the
enumeration covers every row count, each distinct layer shape launches each of its variants once (Triton's CPU
interpreter runs them here), and the background warm-up runs it when MODEL_SERVER_FAST_PRECOMPILE_INT4=1 (what
``model-server compile-cache fill`` sets)."""
from __future__ import annotations

import asyncio

import pytest
import torch
from torch import nn

from model_server import int4_dequant, int4_precompile, int4_triton
from model_server.int4 import ComputeChoice, Int4Linear

SHAPES_1B = ((3072, 2048), (2048, 2048), (16384, 2048), (2048, 8192), (128256, 2048))   # merged qkv, o, gate/up, down, head


@pytest.mark.parametrize("sms", [132, 8])
@pytest.mark.parametrize("n,k", SHAPES_1B)
def test_the_variants_cover_every_row_count(n, k, sms):
    bk = int4_triton.block_k(128)
    found = int4_precompile.variants(n, k, bk, sms, 8192)
    for m in range(1, 8193):
        assert int4_precompile.variant(m, n, k, bk, sms) in found, m
    assert all(int4_precompile.variant(m, n, k, bk, sms) == v for v, m in found.items())
    later = int4_precompile.variants(n, k, bk, sms, 8192, min_rows=9)
    assert min(later.values()) == 9 and all(int4_precompile.variant(m, n, k, bk, sms) in later
                                            for m in range(9, 600))


def test_a_split_config_is_compiled_with_each_reduction_its_rows_take():
    """q/k/v at 1-64 rows on 132 SMs splits K; up to 32 rows the ticket variant, above the sum kernel's: both land in
    the walk, each at its fewest rows."""
    bk = int4_triton.block_k(128)
    found = int4_precompile.variants(3072, 2048, bk, 132, 64)
    reductions = {reduce for (cfg, reduce) in found if cfg.split_k > 1}
    assert reductions == {"ticket", "kernel"}
    assert min(m for (_, reduce), m in found.items() if reduce == "kernel") == 33


def test_each_shape_launches_each_variant_once(monkeypatch):
    monkeypatch.setenv("MODEL_SERVER_INT4_PREFILL_DEQUANT_ROWS", "0")   # every row count on the GEMM (the bound's own
    int4_dequant.min_rows.cache_clear()                                # walk: tests/test_int4_dequant.py)
    if not int4_triton.available():
        pytest.fail("Triton is needed (tests/conftest.py chooses its interpreter where no GPU is present)")
    calls = []
    real = int4_triton.int4_triton_mm

    def spy(x, packed, scales, zeros, group, config=None):
        calls.append((tuple(packed.shape), x.shape[0], config))
        return real(x, packed, scales, zeros, group, config=config)

    monkeypatch.setattr(int4_triton, "int4_triton_mm", spy)
    torch.manual_seed(0)
    choice = ComputeChoice(torch.float32, "cpu-int4pack", "test", rows_kernel="triton")
    a, b = (Int4Linear(nn.Linear(128, 64, bias=False), 64, choice) for _ in range(2))     # one shape, twice
    c = Int4Linear(nn.Linear(256, 32, bias=False), 64, choice)
    plain = nn.Linear(16, 16)
    n = int4_precompile.precompile([nn.Sequential(a, plain, b), c], max_rows=300)
    int4_dequant.min_rows.cache_clear()
    assert n == len(calls) > 0
    for layer in (a, c):
        first = next(r for r in range(1, 65) if layer.runs_triton(r))
        want = int4_precompile.variants(layer.out_features, layer.in_features, int4_triton.block_k(64),
                                        int4_triton._num_sms(torch.device("cpu")), 300, first)
        got = [(m, cfg) for shape, m, cfg in calls if shape == tuple(layer.triton_packed.shape)]
        assert sorted(got, key=lambda t: t[0]) == sorted(((m, cfg) for (cfg, _), m in want.items()), key=lambda t: t[0])
        assert all(m >= first for m, _ in got)


def test_a_merged_gate_up_with_the_glu_epilogue_also_compiles_its_glu_variants(monkeypatch):
    """MODEL_SERVER_INT4_GLU_EPILOGUE: the layers passed as ``glu`` run each variant without split K once more, with
    the epilogue (a first step of that size would otherwise stop for its compile); other layers do not."""
    from model_server import int4_triton_glu
    monkeypatch.setenv("MODEL_SERVER_INT4_PREFILL_DEQUANT_ROWS", "0")
    int4_dequant.min_rows.cache_clear()
    calls = []
    real = int4_triton_glu.int4_triton_glu
    monkeypatch.setattr(int4_triton_glu, "int4_triton_glu",
                        lambda x, *a, config=None: calls.append((a[0].shape[0], x.shape[0], config)) or real(x, *a,
                                                                                                    config=config))
    torch.manual_seed(0)
    choice = ComputeChoice(torch.float32, "triton", "test")
    gate_up = Int4Linear(nn.Linear(128, 1024, bias=False), 64, choice)
    other = Int4Linear(nn.Linear(128, 512, bias=False), 64, choice)
    n = int4_precompile.precompile([gate_up, other], max_rows=200, glu=[gate_up])
    plain = int4_precompile.precompile([gate_up, other], max_rows=200)
    int4_dequant.min_rows.cache_clear()
    first = next(r for r in range(1, 65) if gate_up.runs_triton(r))
    want = [(m, cfg) for (cfg, _), m in int4_precompile.variants(1024, 128, int4_triton.block_k(64),
                                                                 int4_triton._num_sms(torch.device("cpu")), 200,
                                                                 first).items() if cfg.split_k == 1]
    assert want and sorted((m, cfg) for rows, m, cfg in calls) == sorted(want)
    assert all(rows == 1024 for rows, _, _ in calls)           # the gate/up only
    assert n == plain + len(want)


def test_a_bad_switch_value_is_one_line(monkeypatch):
    monkeypatch.setenv("MODEL_SERVER_FAST_PRECOMPILE_INT4", "on")
    with pytest.raises(ValueError, match="MODEL_SERVER_FAST_PRECOMPILE_INT4 must be 0 or 1"):
        int4_precompile.enabled()


def test_the_background_warmup_precompiles_when_asked(tiny_model_dir, monkeypatch):
    """With the switch the warm-up hands the model and its merged projections to precompile (without it, never)."""
    from model_server.engines.fast import FastEngine
    from model_server.loading import load_model

    seen = []
    monkeypatch.setattr(int4_precompile, "precompile",
                        lambda modules, max_rows, glu=(): seen.append((list(modules), max_rows, list(glu))) or 0)
    loaded = load_model(tiny_model_dir, "cpu", "int4", True)

    async def run(switch: str) -> None:
        monkeypatch.setenv("MODEL_SERVER_FAST_PRECOMPILE_INT4", switch)
        eng = FastEngine(loaded.model, list(loaded.eos_token_ids), max_batch=2, max_seq_len=64, length_buckets=[64],
                         device="cpu", fuse=False, background_warmup=True)
        await eng.start()
        try:
            assert await eng.wait_warm(60)
        finally:
            await eng.stop()
        return eng

    from model_server import int4_triton_config
    asyncio.run(run("0"))
    assert seen == []
    monkeypatch.setenv(int4_triton_config.GLU_SWITCH, "0")
    int4_triton_config.glu_on.cache_clear()
    try:
        eng = asyncio.run(run("1"))
    finally:
        int4_triton_config.glu_on.cache_clear()
    assert len(seen) == 1
    modules, max_rows, glu = seen[0]
    r = eng.runner
    assert modules[0] is r.model and max_rows == r.max_batch * r.max_len
    assert [m for m in modules[1:]] == [m for m in (*r.qkv, *r.gate_up) if m is not None]
    assert glu == []                                          # the GLU epilogue off: no GLU variants
    monkeypatch.delenv(int4_triton_config.GLU_SWITCH)         # on by default
    int4_triton_config.glu_on.cache_clear()
    try:
        eng = asyncio.run(run("1"))
    finally:
        int4_triton_config.glu_on.cache_clear()
    gate_up = [m.fn for m in eng.runner.gate_up if m is not None]
    assert gate_up and seen[1][2] == gate_up
