"""Test support for the fast engine's CPU tests: the tiny random Llama and Qwen2 models (fp32), greedy
references from ``model.generate``, collecting a request's tokens from an engine, seeded prompts, a small CPU
engine, and the greedy-vs-``generate`` and one-decode-step-both-ways checks a fused kernel's tests reuse.

Used by tests/test_fast_engine.py, tests/test_fast_decode_attn.py and tests/test_fast_rope_kv.py. Must NOT
hold tests or fixtures (the test files build their models in their own module fixtures).
"""
from __future__ import annotations

import asyncio
import random

import pytest
import torch

transformers = pytest.importorskip("transformers")

from model_server.engines.base import GenerationRequest, SamplingParams  # noqa: E402
from model_server.engines.fast import FastEngine  # noqa: E402

EOS = 3


def _tiny(arch: str, seed: int = 0, **config):
    """A random 2-layer ``arch`` ("llama" or "qwen2") model in fp32; ``config`` overrides the config's sizes."""
    torch.manual_seed(seed)
    common = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  eos_token_id=EOS, pad_token_id=0, bos_token_id=1)
    common.update(config)
    if arch == "llama":
        cfg = transformers.LlamaConfig(**common)
        model = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.Qwen2Config(**common)
        model = transformers.Qwen2ForCausalLM(cfg)
        with torch.no_grad():   # make the q/k/v biases matter
            for layer in model.model.layers:
                for p in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    p.bias.normal_(0, 0.5)
    with torch.no_grad():       # sharper logits than the 0.02 init, so greedy paths are far from ties
        model.lm_head.weight.normal_(0, 0.5)
    return model.float().eval()


def _reference(model, prompt: list[int], n: int, ignore_eos: bool = False) -> list[int]:
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=n, min_new_tokens=n if ignore_eos else 0, do_sample=False,
                             eos_token_id=EOS, pad_token_id=0)
    return out[0, len(prompt):].tolist()


async def _collect(engine, req: GenerationRequest, delay: float = 0.0, cancel_after: int | None = None):
    await asyncio.sleep(delay)
    toks, reason = [], None
    async for ev in engine.submit(req):
        if ev.token_id is not None:
            toks.append(ev.token_id)
        if ev.finish_reason is not None:
            reason = ev.finish_reason
        if cancel_after is not None and len(toks) >= cancel_after and reason is None:
            engine.cancel(req.request_id)
            cancel_after = None
    return toks, reason


def _prompts(rng: random.Random, n: int, lo: int, hi: int) -> list[list[int]]:
    return [[rng.randrange(4, 96) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def _staggered_greedy(model, prompts: list[list[int]], n: int = 12, **engine_kw):
    """Greedy tokens of ``prompts`` through a 4-slot CPU engine (``engine_kw`` added), arriving 2 ms apart;
    returns them and the engine's runner (stopped engine, cache kept)."""
    async def main():
        eng = FastEngine(model, [EOS], device="cpu", max_batch=4, max_seq_len=64, length_buckets=[32, 64], **engine_kw)
        await eng.start()
        try:
            res = await asyncio.gather(*(_collect(eng, GenerationRequest(f"r{i}", p, SamplingParams(max_new_tokens=n)),
                                                  delay=0.002 * i) for i, p in enumerate(prompts)))
            return [t for t, _ in res], eng.runner
        finally:
            await eng.stop()
    return asyncio.run(main())


def _greedy_vs_generate(arch: str, prompt_seed: int, **engine_kw):
    """(the engine's greedy tokens, ``model.generate``'s, the runner) for 6 prompts of 1-20 tokens (seeded) on the
    tiny ``arch`` model, through :func:`_staggered_greedy` with ``engine_kw``."""
    model = _tiny(arch, seed=0 if arch == "llama" else 1)
    prompts = _prompts(random.Random(prompt_seed), 6, 1, 20)
    toks, runner = _staggered_greedy(model, prompts, **engine_kw)
    return toks, [_reference(model, p, 12) for p in prompts], runner


def _decode_both(runner, flag: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One decode step's logits on three rows with ``runner.<flag>`` as it is, the K cache after it, then the
    same step's logits with the flag off (the K cache after that is ``runner.cache.k``)."""
    with torch.inference_mode():
        runner.in_ids[:3] = torch.tensor([5, 9, 11])
        runner.in_pos[:3] = torch.tensor([4, 0, 17])
        one = runner.decode_forward(3, 32).clone()
        k_one = runner.cache.k.clone()
        setattr(runner, flag, False)
        return one, k_one, runner.decode_forward(3, 32)


def _engine(model, **kw):
    kw.setdefault("max_batch", 4)
    kw.setdefault("max_seq_len", 64)
    kw.setdefault("length_buckets", [16, 32, 48, 64])
    return FastEngine(model, [EOS], device="cpu", **kw)

