"""Merged projections (q/k/v, gate/up as one GEMM): same outputs as the parts, no extra memory, and
the fast engine uses them (greedy output against ``generate`` is tested in test_fast_engine.py and
test_int4.py with merging on, the default)."""
from __future__ import annotations

import asyncio

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from model_server.engines.base import GenerationRequest, SamplingParams  # noqa: E402
from model_server.engines.fast import FastEngine  # noqa: E402
from model_server.engines.fast.merged import merge  # noqa: E402
from model_server.int4 import Int4Linear, choose_compute  # noqa: E402


def _linears(bias: bool, sizes=(64, 32, 32), k: int = 128, dtype=torch.float32) -> list[nn.Linear]:
    torch.manual_seed(0)
    return [nn.Linear(k, n, bias=bias).to(dtype) for n in sizes]


@pytest.mark.parametrize("bias", [False, True])
def test_merged_linear_equals_its_parts_and_shares_their_memory(bias):
    parts = _linears(bias)
    x = torch.randn(5, 7, 128)
    with torch.no_grad():
        want = [p(x) for p in parts]
        merged = merge(parts)
        got = merged(x)
        after = [p(x) for p in parts]       # the parts still compute what they did
    assert merged is not None and len(got) == 3
    for g, w, a in zip(got, want, after):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a, w, rtol=0, atol=0)
    base = merged.fn.weight.untyped_storage().data_ptr()
    assert all(p.weight.untyped_storage().data_ptr() == base for p in parts)
    if bias:
        assert all(p.bias.untyped_storage().data_ptr() == merged.fn.bias.untyped_storage().data_ptr() for p in parts)


def test_merged_int4_equals_its_parts():
    choice = choose_compute("cpu", None)
    parts = [Int4Linear(lin, 32, choice) for lin in _linears(True, (64, 32, 32), 128, torch.bfloat16)]
    x = torch.randn(4, 128, dtype=torch.bfloat16)
    with torch.inference_mode():
        want = [p(x) for p in parts]
        merged = merge(parts)
        got = merged(x)
        after = [p(x) for p in parts]
    assert merged is not None
    for g, w, a in zip(got, want, after):
        assert torch.equal(g, w) and torch.equal(a, w)


def test_what_cannot_merge_stays_separate():
    a, b = _linears(False, (32, 32))
    assert merge([a]) is None
    assert merge([a, nn.Identity()]) is None
    c = nn.Linear(64, 32, bias=False)                      # another input width
    assert merge([a, c]) is None
    d = nn.Linear(128, 32, bias=True)                      # bias on one part only
    assert merge([a, d]) is None


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_engine_merges_every_layer_and_matches_unmerged(arch):
    torch.manual_seed(3)
    common = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  eos_token_id=3, pad_token_id=0, bos_token_id=1)
    cls, cfg_cls = ((transformers.LlamaForCausalLM, transformers.LlamaConfig) if arch == "llama"
                    else (transformers.Qwen2ForCausalLM, transformers.Qwen2Config))
    model = cls(cfg_cls(**common)).float().eval()
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.5)
    prompt = [5, 9, 17, 33, 2, 40, 41]

    async def run(merge_projections: bool):
        eng = FastEngine(model, [3], max_batch=2, max_seq_len=64, device="cpu", length_buckets=[32, 64],
                         merge_projections=merge_projections)
        await eng.start()
        try:
            toks = [ev.token_id async for ev in eng.submit(GenerationRequest(
                "r", prompt, SamplingParams(max_new_tokens=20, ignore_eos=True))) if ev.token_id is not None]
            return toks, eng.stats().extra["merged_projections"]
        finally:
            await eng.stop()

    plain, n_plain = asyncio.run(run(False))
    merged, n_merged = asyncio.run(run(True))
    assert n_plain == 0 and n_merged == 2 * 2          # q/k/v and gate/up in each of 2 layers
    assert merged == plain and len(merged) == 20
