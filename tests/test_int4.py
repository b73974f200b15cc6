"""INT4 weight-only path (``--quantization int4``) on CPU: kernel vs its own dequantized weight, the
compute choice by compute capability (faked: T4 is 7.5), load + fast engine + a real server."""
from __future__ import annotations

import asyncio
import json
import random
import urllib.request

import pytest
import torch
from torch import nn

from model_server.engines.base import GenerationRequest, SamplingParams
from model_server import int4_quant
from model_server.int4 import ComputeChoice, Int4Linear, choose_compute, quantize_model
from model_server.int4_quant import dequantize_groupwise, quantize_groupwise
from tests.conftest import start_model_server


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm())


@pytest.mark.parametrize("group", [32, 64, 128])
def test_quantization_error_is_within_half_a_step(group):
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(group)) * 0.05
    q, sz = quantize_groupwise(w, group)
    assert q.dtype == torch.uint8 and int(q.max()) <= 15
    back = dequantize_groupwise(q, sz, group)
    step = sz[..., 0].transpose(0, 1).repeat_interleave(group, dim=1)      # [N, K] per-weight scale
    assert bool(((back - w).abs() <= step / 2 + 1e-6).all())
    assert _rel(back, w) < 0.1


def _group_sq_err(w: torch.Tensor, group: int, search: bool) -> torch.Tensor:
    q, sz = quantize_groupwise(w, group, clip_search=search)
    return ((dequantize_groupwise(q, sz, group) - w) ** 2).reshape(w.shape[0], -1, group).sum(-1)


def test_clip_search_is_never_worse_than_min_max_per_group():
    """Heavy-tailed weights (Student t, 3 degrees of freedom, like trained layers' outliers): per group, the searched
    range's squared error is at most min-max's, and over the layer clearly lower."""
    torch.manual_seed(7)
    w = torch.distributions.StudentT(3.0).sample((96, 512)) * 0.02
    mm, se = _group_sq_err(w, 64, False), _group_sq_err(w, 64, True)
    assert bool((se <= mm * (1 + 1e-6) + 1e-12).all())
    assert float(se.sum() / mm.sum()) < 0.95


def test_clip_search_clips_an_outlier_and_keeps_the_layout(monkeypatch):
    w = torch.linspace(-1, 1, 128).repeat(8, 1)
    w[:, 5] = 6.0                                        # one outlier per group of 128
    q, sz = quantize_groupwise(w, 128, clip_search=True)
    q0, sz0 = quantize_groupwise(w, 128)
    assert bool((sz[..., 0] < sz0[..., 0]).all())        # a finer step: the range was clipped
    assert float(_group_sq_err(w, 128, True).sum()) < float(_group_sq_err(w, 128, False).sum())
    monkeypatch.setattr(int4_quant, "SEARCH_CHUNK", 3 * 128)   # rows in chunks of 3: the same result
    q2, sz2 = quantize_groupwise(w, 128, clip_search=True)
    assert torch.equal(q, q2) and torch.equal(sz, sz2)


@pytest.mark.parametrize("kernel,dtype", [("cpu-int4pack", torch.bfloat16), ("cpu-int4pack", torch.float32),
                                          ("dequant", torch.float32)])
def test_int4_linear_computes_x_times_its_dequantized_weight(kernel, dtype):
    g = torch.Generator().manual_seed(hash(kernel) % 1000 + int(dtype.itemsize))
    lin = nn.Linear(256, 96, bias=True)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(96, 256, generator=g) * 0.05)
        lin.bias.copy_(torch.randn(96, generator=g))
    m = Int4Linear(lin.to(dtype), 64, ComputeChoice(dtype, kernel, "test"))
    x = torch.randn(3, 5, 256, generator=g).to(dtype)
    q, sz = quantize_groupwise(lin.weight, 64)
    ref = x.double() @ dequantize_groupwise(q, sz, 64).double().t() + lin.bias.double()
    out = m(x)
    assert out.shape == (3, 5, 96) and out.dtype == dtype
    assert _rel(out, ref) < (1e-2 if dtype == torch.bfloat16 else 1e-5)


def test_a_layer_cpu_int4pack_cannot_pack_stays_in_float():
    # the CPU packing needs N a multiple of 16 (CUDA's of 8): a 24-output layer is left as it is, not a load crash
    choice = ComputeChoice(torch.float32, "cpu-int4pack", "test")
    model = nn.Sequential(nn.Linear(128, 24), nn.Linear(128, 32))
    assert quantize_model(model, 64, choice, lm_head=False) == 1
    assert isinstance(model[0], nn.Linear) and isinstance(model[1], Int4Linear)
    with pytest.raises(ValueError, match=r"\[24, 128\]"):
        Int4Linear(nn.Linear(128, 24), 64, choice)
    assert isinstance(Int4Linear(nn.Linear(128, 24), 64, ComputeChoice(torch.float32, "dequant", "test")), Int4Linear)


@pytest.mark.parametrize("cap,dtype,kernel", [((7, 5), torch.float16, "dequant"),
                                              ((7, 0), torch.float16, "dequant"),
                                              ((8, 0), torch.bfloat16, "cuda-int4pack"),
                                              ((9, 0), torch.bfloat16, "cuda-int4pack")])
def test_compute_choice_by_capability(cap, dtype, kernel):
    c = choose_compute("cuda", cap)
    assert (c.dtype, c.int4_kernel) == (dtype, kernel)
    assert choose_compute("cpu", None).int4_kernel == "cpu-int4pack"


def test_fast_engine_picks_fp16_on_a_faked_t4(monkeypatch):
    from model_server.engines.fast import support as fe

    bf16 = torch.zeros(1, dtype=torch.bfloat16)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert fe.default_dtype(bf16, "cuda") == torch.float16
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert fe.default_dtype(bf16, "cuda") == torch.bfloat16
    assert fe.default_dtype(bf16, "cpu") is None
    assert fe.default_dtype(torch.zeros(1), "cuda") is None


def _greedy_fast(model, prompts, n):
    from model_server.engines.fast import FastEngine

    async def main():
        eng = FastEngine(model, [], max_batch=4, max_seq_len=64, device="cpu")
        await eng.start()
        try:
            async def one(i, p):
                toks = []
                async for ev in eng.submit(GenerationRequest(f"q{i}", p, SamplingParams(max_new_tokens=n))):
                    if ev.token_id is not None:
                        toks.append(ev.token_id)
                return toks
            return await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
        finally:
            await eng.stop()
    return asyncio.run(main())


def _greedy_hf(model, p, n):
    with torch.inference_mode():
        out = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                             max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(p):].tolist()


def test_int4_load_fast_engine_matches_generate(tiny_model_dir):
    from model_server.loading import load_model

    bf = load_model(tiny_model_dir, "cpu", "bf16")
    q4 = load_model(tiny_model_dir, "cpu", "int4")
    assert q4.quantization == "int4"
    n_int4 = sum(isinstance(m, Int4Linear) for m in q4.model.modules())
    assert n_int4 == 2 * 7 + 1                                  # 2 layers x (q,k,v,o,gate,up,down) + lm_head
    # tied embedding stays bf16 (rows are gathered); the rest is 4-bit plus a scale and zero per 128 weights
    assert q4.weight_bytes < 0.8 * bf.weight_bytes
    # identity of the fast engine's batched decode with generate() on the same INT4 weights, in fp32
    # compute (bf16 batched vs single-row rounding flips near-ties on a random tiny model)
    m = load_model(tiny_model_dir, "cpu", "none").model.float()
    assert quantize_model(m, 128, ComputeChoice(torch.float32, "cpu-int4pack", "test")) == n_int4
    rng = random.Random(3)
    vocab = m.config.vocab_size
    prompts = [[rng.randrange(5, vocab) for _ in range(rng.randint(2, 20))] for _ in range(6)]
    fast = _greedy_fast(m, prompts, 12)
    assert fast == [_greedy_hf(m, p, 12) for p in prompts]


def test_int4_lm_head_can_stay_in_the_compute_dtype(tiny_model_dir, monkeypatch):
    """MODEL_SERVER_INT4_LM_HEAD=0: the decoder's linears in INT4, the (tied) LM head as loaded; a bad value is a
    one-line load error."""
    from model_server.loading import LoadError, load_model

    monkeypatch.setenv("MODEL_SERVER_INT4_LM_HEAD", "0")
    q4 = load_model(tiny_model_dir, "cpu", "int4")
    assert sum(isinstance(m, Int4Linear) for m in q4.model.modules()) == 2 * 7
    assert type(q4.model.lm_head) is nn.Linear and q4.model.lm_head.weight is q4.model.get_input_embeddings().weight
    monkeypatch.setenv("MODEL_SERVER_INT4_LM_HEAD", "yes")
    with pytest.raises(LoadError, match="MODEL_SERVER_INT4_LM_HEAD"):
        load_model(tiny_model_dir, "cpu", "int4")


def test_int4_server_reports_and_serves(tiny_model_dir):
    import openai

    with start_model_server(tiny_model_dir, "--quantization", "int4", "--engine", "fast") as srv:
        with urllib.request.urlopen(srv.url + "/info", timeout=10) as r:
            info = json.loads(r.read())
        assert json.dumps(info).count('"int4"') >= 1
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        out = client.completions.create(model=client.models.list().data[0].id, prompt="hello",
                                        max_tokens=5, temperature=0)
        assert out.usage.completion_tokens == 5
