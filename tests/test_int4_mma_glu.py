"""The mma kernel's GLU epilogue (model_server/int4_mma_glu.py), on CPU.

The kernel is CUDA's (its compile for sm_80 / sm_90 is tests/test_int4_mma_nvrtc.py's; its bits on a GPU are
benchmarks/int4_mma_glu_check.py's): here ``int4_mma.launch`` is replaced by a reference that reads only the mma
buffers and, for a GLU configuration, stores ``silu(gate) * up`` rounded where the separate ops round. What is
tested is what surrounds the kernel: the configurations it gets, the first-use check that keeps a wrong kernel out
(a reference that swaps gate and up fails it), and the MLP's path through ``Int4Linear.forward_silu_mul``."""
from __future__ import annotations

import asyncio
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from model_server import int4_mma, int4_mma_glu
from model_server.int4 import ComputeChoice, Int4Linear
from tests.test_int4_mma import _mma_reference


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    monkeypatch.delenv(int4_mma_glu.SWITCH, raising=False)     # on by default
    monkeypatch.setattr(int4_mma_glu, "_CHECKED", {})
    monkeypatch.setattr(int4_mma, "reserve", lambda *a, **k: None)
    monkeypatch.setattr(int4_mma, "_num_sms", lambda dev: 132)
    monkeypatch.setattr(int4_mma, "device_index", lambda dev: 0)
    int4_mma_glu.on.cache_clear()
    yield
    int4_mma_glu.on.cache_clear()


def _fake_launch(monkeypatch, swap: bool = False) -> list[int4_mma.Config]:
    """``int4_mma.launch`` as a CPU reference (``swap``: a wrong epilogue, up and gate exchanged); returns the
    configurations launched."""
    launched: list[int4_mma.Config] = []

    def launch(x2d, words, scales, group_size, cfg, y):
        launched.append(cfg)
        full = _mma_reference(x2d, words, scales, group_size).to(torch.bfloat16)
        if cfg.glu:
            gate, up = full.chunk(2, dim=1)
            if swap:
                gate, up = up, gate
            y.copy_((F.silu(gate.float()).to(torch.bfloat16).float() * up.float()).to(torch.bfloat16))
        else:
            y.copy_(full)
    monkeypatch.setattr(int4_mma, "launch", launch)
    return launched


def test_glu_configs_keep_the_plain_kernels_tiles_per_cta_grid_and_split() -> None:
    for sms in (108, 132):
        for m in range(1, 33):
            base = int4_mma.choose_config(m, 16384, 2048, sms)
            cfg = int4_mma_glu.glu_config(m, 16384, 2048, sms)
            assert cfg is not None and cfg.glu == 1 and cfg.r % 2 == 0 and int4_mma.fits(cfg, m, 2048), (m, cfg)
            assert (cfg.split, cfg.nt, cfg.kw) == (base.split, base.nt, base.kw)
            assert cfg.r * cfg.row_groups() == base.r * base.row_groups()            # as many tiles per CTA
            assert cfg.grid_x(16384) == base.grid_x(16384)
    assert int4_mma_glu.glu_config(1, 16400, 2048, 132) is None            # I = 8,200 is no whole number of tiles


def test_the_check_passes_the_epilogue_and_keeps_out_one_that_swaps_gate_and_up(monkeypatch, caplog) -> None:
    launched = _fake_launch(monkeypatch)
    dev = torch.device("cpu")
    assert not int4_mma_glu.ready(dev)
    assert int4_mma_glu.check(dev) is None and int4_mma_glu.ready(dev)
    assert {c.split for c in launched if c.glu} == {1, 2} and any(not c.glu for c in launched)
    n = len(launched)
    assert int4_mma_glu.check(dev) is None and len(launched) == n            # once per device
    monkeypatch.setattr(int4_mma_glu, "_CHECKED", {})
    _fake_launch(monkeypatch, swap=True)
    with caplog.at_level(logging.WARNING, logger="model_server.int4_mma_glu"):
        why = int4_mma_glu.check(dev)
    assert why is not None and why.startswith("differs from the GEMM and SiLU-mul at 1 rows")
    assert not int4_mma_glu.ready(dev)
    assert [r.levelname for r in caplog.records] == ["WARNING"] and "GLU epilogue off" in caplog.text


def test_a_kernel_that_raises_is_one_line_and_off(monkeypatch) -> None:
    def boom(*a, **k):
        raise RuntimeError("CUDA error: an illegal memory access\nwas encountered")
    monkeypatch.setattr(int4_mma, "launch", boom)
    why = int4_mma_glu.check(torch.device("cpu"))
    assert why == "RuntimeError: CUDA error: an illegal memory access was encountered"
    assert not int4_mma_glu.ready(torch.device("cpu"))


def _gate_up(k: int = 256, inter: int = 32) -> Int4Linear:
    torch.manual_seed(3)
    return Int4Linear(nn.Linear(k, 2 * inter, bias=False), 64, ComputeChoice(torch.bfloat16, "mma", "test",
                                                                             rows_kernel="triton"))


def test_the_mlp_takes_the_epilogue_once_checked_and_not_with_the_switch_off(monkeypatch) -> None:
    launched = _fake_launch(monkeypatch)
    layer = _gate_up()
    x = torch.randn(2, 4, 256).to(torch.bfloat16)                          # 8 rows: the mma kernel's (no int4pack)
    assert layer.step_kernel(8) == "mma"
    assert layer.forward_silu_mul(x) is None and not launched                 # not checked yet: the unfused path
    assert int4_mma_glu.check(torch.device("cpu")) is None
    launched.clear()
    got = layer.forward_silu_mul(x)
    gate, up = layer(x).chunk(2, dim=-1)
    assert got is not None and got.shape == (2, 4, 32)
    assert torch.equal(got, F.silu(gate) * up)                               # the separate ops' bits
    assert [c.glu for c in launched] == [1, 0]                                # the epilogue, then forward()'s GEMM
    assert launched[0] == int4_mma_glu.glu_config(8, 64, 256, 132)
    for value, served in (("1", True), ("", True), ("0", False)):             # empty or unset: on by default
        monkeypatch.setenv(int4_mma_glu.SWITCH, value)
        int4_mma_glu.on.cache_clear()
        assert (layer.forward_silu_mul(x) is not None) is served
    monkeypatch.setenv(int4_mma_glu.SWITCH, "yes")
    int4_mma_glu.on.cache_clear()
    with pytest.raises(ValueError, match=int4_mma_glu.SWITCH):           # a bad value fails the load, in one line
        _gate_up()


def test_precompile_asks_for_the_gate_ups_glu_configs_only(monkeypatch) -> None:
    from model_server import int4_precompile
    asked: list[str] = []
    monkeypatch.setattr(int4_mma, "kernel", lambda name, index: asked.append(name))
    choice = ComputeChoice(torch.float32, "mma", "test", rows_kernel="triton")
    gate_up, down = (Int4Linear(nn.Linear(256, n, bias=False), 64, choice) for n in (16384, 2048))
    int4_precompile.precompile_mma([down], glu=[gate_up])
    glu = {c.name() for r in range(1, 33) if (c := int4_mma_glu.glu_config(r, 16384, 256, 132)) is not None}
    assert glu and glu <= set(asked)
    asked.clear()
    int4_precompile.precompile_mma([down, gate_up])                            # not named as a gate/up: no GLU
    assert not glu & set(asked) and asked
    asked.clear()
    monkeypatch.setenv(int4_mma_glu.SWITCH, "0")
    int4_mma_glu.on.cache_clear()
    int4_precompile.precompile_mma([down], glu=[gate_up])
    assert not glu & set(asked) and asked


def _serve(model, background: bool) -> list[int]:
    from model_server.engines.base import GenerationRequest, SamplingParams
    from model_server.engines.fast import FastEngine
    from tests.fast_engine_support import EOS

    async def main() -> list[int]:
        eng = FastEngine(model, [EOS], max_batch=2, max_seq_len=64, length_buckets=[32, 64], device="cpu",
                         dtype=torch.bfloat16, background_warmup=background)
        await eng.start()
        try:
            assert await eng.wait_warm(10)
            toks = []
            params = SamplingParams(max_new_tokens=6, ignore_eos=True)
            async for ev in eng.submit(GenerationRequest("r", [5, 17, 33, 9, 60], params)):
                toks += [ev.token_id] if ev.token_id is not None else []
            return toks
        finally:
            await eng.stop()
    return asyncio.run(main())


@pytest.mark.parametrize("background", [False, True])
def test_the_engine_serves_the_epilogue_however_it_starts(monkeypatch, background) -> None:
    """The check runs before the engine serves, with or without the background warm-up (ModelRunner.prepare; the
    in-process benchmarks start without it), so a served step's gate/up takes the epilogue, with the same tokens."""
    from model_server import int4_choice
    from model_server.int4 import quantize_model
    from tests.fast_engine_support import _tiny
    launched = _fake_launch(monkeypatch)
    monkeypatch.setattr(int4_mma, "kernel", lambda name, index: None)         # the warm-up's precompile (NVRTC's)
    monkeypatch.setenv(int4_choice.MMA_INT4PACK_SWITCH, "0")                  # one-row steps on the mma kernel too
    int4_choice.mma_int4pack_switch.cache_clear()
    tokens = {}
    for switch in ("0", "1"):
        monkeypatch.setenv(int4_mma_glu.SWITCH, switch)
        int4_mma_glu.on.cache_clear()
        monkeypatch.setattr(int4_mma_glu, "_CHECKED", {})
        model = _tiny("llama", hidden_size=128, intermediate_size=256, vocab_size=128).to(torch.bfloat16)
        quantize_model(model, 64, ComputeChoice(torch.bfloat16, "mma", "test", rows_kernel="triton"))
        launched.clear()
        tokens[switch] = _serve(model, background)
        glu = [c for c in launched if c.glu]
        assert (len(glu) >= 2 * 6) == (switch == "1"), (switch, len(glu))    # 2 layers x (prefill + 5 decode steps)
    int4_choice.mma_int4pack_switch.cache_clear()
    assert len(tokens["1"]) == 6 and tokens["1"] == tokens["0"]
