"""Shared by the INT4 Triton kernel tests: Triton's CPU interpreter for every test of a module that imports
:func:`interpreter`, and the float64 reference product they compare with."""
from __future__ import annotations

import pytest
import torch

from model_server import int4_triton
from model_server.int4_quant import dequantize_groupwise


@pytest.fixture(autouse=True)
def interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert int4_triton.available()


def reference(x: torch.Tensor, q: torch.Tensor, sz: torch.Tensor, group: int) -> torch.Tensor:
    """``x @ dequant(q)^T`` in float64."""
    return x.double() @ dequantize_groupwise(q, sz, group).double().t()


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    """Relative Frobenius error of ``got`` against ``want``."""
    return float((got.double() - want).norm() / want.norm())


def set_switch(monkeypatch, name: str, value: str, cached) -> None:
    """Set the switch ``name`` to ``value`` for this test and clear ``cached``, the function that reads it once."""
    monkeypatch.setenv(name, value)
    cached.cache_clear()


def fresh_switch(cached):
    """An autouse fixture (assign it to a name in the test module) that clears ``cached`` around each test."""
    @pytest.fixture(autouse=True)
    def _fresh():
        cached.cache_clear()
        yield
        cached.cache_clear()
    return _fresh


def tiny_int4_runner(**engine_kw):
    """The fast engine's runner (CPU) over a tiny INT4 Llama (hidden 256, MLP 512, 4 heads, 1 K/V head) whose
    linears all run the Triton kernels; ``engine_kw`` go to ``FastEngine``."""
    from model_server.engines.fast import FastEngine
    from model_server.int4 import quantize_model
    from model_server.int4_choice import ComputeChoice
    from tests.fast_engine_support import EOS, _tiny

    model = _tiny("llama", hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=1)
    quantize_model(model, 64, ComputeChoice(torch.float32, "triton", "test"))
    return FastEngine(model, [EOS], device="cpu", max_batch=48, max_seq_len=64, length_buckets=[64], **engine_kw).runner


def decode_off_on(runner, switch) -> dict[str, tuple]:
    """One 40-row decode step (the same random tokens and positions) after ``switch("0")`` and after ``switch("1")``:
    ``{value: (logits, K cache, V cache)}``."""
    g = torch.Generator()
    out = {}
    for value in ("0", "1"):
        switch(value)
        with torch.inference_mode():
            runner.in_ids[:40] = torch.randint(5, 96, (40,), generator=g.manual_seed(5))
            runner.in_pos[:40] = torch.randint(0, 60, (40,), generator=g.manual_seed(6))
            out[value] = (runner.decode_forward(40, 64).clone(), runner.cache.k.clone(), runner.cache.v.clone())
    return out
