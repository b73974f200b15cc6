"""Decode attention as one Triton kernel (``engines/fast/decode_attn.py``), run by Triton's interpreter on CPU:
it must give what SDPA with the engine's position mask gives (fp32 to rounding, bf16 to bf16's precision),
including rows whose position is past the length bucket (padding rows) and buckets that are not a multiple
of the kernel's key block, and a fast engine using it must still produce ``model.generate``'s greedy tokens."""
from __future__ import annotations


import pytest
import torch

from model_server.engines.fast import FastEngine
from model_server.engines.fast import decode_attn
from model_server.engines.fast.decode_attn import available, decode_attention, sdpa_reference
from model_server.engines.fast.factory import from_loaded

from tests.fast_engine_support import EOS, _decode_both, _greedy_vs_generate, _tiny

pytestmark = pytest.mark.skipif(not available(16), reason="Triton is a declared dependency; CI installs it")


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("b,kv,g,d,length", [(5, 2, 2, 16, 80), (3, 4, 4, 32, 40), (2, 1, 8, 16, 150)])
def test_matches_sdpa(dtype, tol, b, kv, g, d, length):
    gen = torch.Generator().manual_seed(7)
    slots, max_len = b + 2, 160
    q = torch.randn(b, kv, g, d, generator=gen).to(dtype)
    kc = torch.randn(slots, kv, max_len, d, generator=gen).to(dtype)
    vc = torch.randn(slots, kv, max_len, d, generator=gen).to(dtype)
    pos = torch.randint(0, length, (b,), generator=gen)
    pos[0] = 0                                   # one key only
    pos[-1] = max_len - 1                        # a padding row: past the bucket, sees all `length` keys
    out = decode_attention(q, kc, vc, pos, length, 0.125)
    ref = sdpa_reference(q, kc, vc, pos, length, 0.125)
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("b,kv,g,length,splits", [(3, 2, 2, 300, 3), (2, 1, 4, 390, 5), (4, 2, 2, 256, 16)])
def test_split_keys_match_sdpa(dtype, tol, b, kv, g, length, splits):
    """The key range split over programs and combined by log-sum-exp (flash-decoding) gives SDPA's result too,
    with rows whose keys end before most splits (position 0) and padding rows past the bucket."""
    gen = torch.Generator().manual_seed(11)
    max_len = 400
    q = torch.randn(b, kv, g, 16, generator=gen).to(dtype)
    kc = torch.randn(b + 1, kv, max_len, 16, generator=gen).to(dtype)
    vc = torch.randn(b + 1, kv, max_len, 16, generator=gen).to(dtype)
    pos = torch.randint(0, length, (b,), generator=gen)
    pos[0], pos[-1] = 0, max_len - 1
    out = decode_attention(q, kc, vc, pos, length, 0.125, splits=splits)
    torch.testing.assert_close(out.float(), sdpa_reference(q, kc, vc, pos, length, 0.125), atol=tol, rtol=tol)


def test_choose_splits():
    from model_server.engines.fast.decode_attn import choose_splits

    assert choose_splits(1, 8, 192, 132) == 1          # 3 key blocks: one pass
    assert choose_splits(64, 8, 2048, 132) == 1        # 512 programs already fill 132 multiprocessors
    assert choose_splits(1, 8, 1152, 132) == 9         # 18 blocks: 9 splits of 2 blocks, 72 programs
    assert choose_splits(8, 8, 2048, 132) == 3         # 192 programs
    assert choose_splits(1, 1, 100_000, 132) == 16     # at most 16


def test_keys_past_the_position_are_not_seen():
    """Changing a cached key or value after a row's position (or in another slot) changes nothing for it."""
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(2, 2, 2, 16, generator=gen)
    kc = torch.randn(3, 2, 64, 16, generator=gen)
    vc = torch.randn(3, 2, 64, 16, generator=gen)
    pos = torch.tensor([10, 30])
    before = decode_attention(q, kc, vc, pos, 64, 0.25)
    kc[0, :, 11:] = 1e4
    vc[0, :, 11:] = -1e4
    kc[2] = 1e4                                  # the scratch slot
    after = decode_attention(q, kc, vc, pos, 64, 0.25)
    assert torch.equal(before, after)
    kc[0, :, 10] += 1.0                          # the row's own last key does matter
    assert not torch.equal(decode_attention(q, kc, vc, pos, 64, 0.25)[0], before[0])


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_engine_with_the_kernel_matches_generate(arch):
    toks, refs, runner = _greedy_vs_generate(arch, 9, decode_attn=True)
    assert runner.decode_attn and toks == refs
    one, _, two = _decode_both(runner, "decode_attn")       # the kernel, then SDPA, on the same cache
    torch.testing.assert_close(one, two, atol=1e-5, rtol=1e-5)


def test_switch_from_the_environment(monkeypatch):
    class Loaded:
        model = _tiny("llama")
        eos_token_ids = [EOS]
        context_length = 128

    assert not from_loaded(Loaded(), max_batch=2, max_total_tokens=32).runner.decode_attn     # off on CPU
    monkeypatch.setenv("MODEL_SERVER_FAST_DECODE_ATTN", "1")
    assert from_loaded(Loaded(), max_batch=2, max_total_tokens=32).runner.decode_attn
    monkeypatch.setenv("MODEL_SERVER_FAST_DECODE_ATTN", "yes")
    with pytest.raises(ValueError, match="MODEL_SERVER_FAST_DECODE_ATTN must be 0 or 1"):
        from_loaded(Loaded(), max_batch=2, max_total_tokens=32)


def test_on_by_default_on_cuda_bf16_and_fp16_only():
    assert decode_attn.available(64)                        # Triton's interpreter here (TRITON_INTERPRET=1)
    assert decode_attn.on_by_default("cuda", torch.bfloat16, 64)
    assert decode_attn.on_by_default("cuda", torch.float16, 128)
    assert not decode_attn.on_by_default("cuda", torch.float32, 64)     # fp32 models keep SDPA
    assert not decode_attn.on_by_default("cpu", torch.bfloat16, 64)     # the interpreter is for tests, not serving
    assert not decode_attn.on_by_default("cuda", torch.bfloat16, 48)    # head size not a power of two


_COMPILE = r'''
import os, sys
sys.path.insert(0, os.getcwd())
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from model_server.engines.fast import decode_attn as da
da.available(64)
fn = triton.jit(da._decode_attn_kernel)
comb = triton.jit(da._combine_kernel)
names = ["q_ptr", "k_ptr", "v_ptr", "pos_ptr", "o_ptr", "lse_ptr", "scale", "length", "chunk", "sq_b", "sq_h", "sq_g",
         "sk_b", "sk_h", "sk_l", "so_b", "so_h", "so_s", "so_g"]
cnames = ["part_ptr", "lse_ptr", "o_ptr", "sp_b", "sp_h", "sp_s", "sp_g", "so_b", "so_h", "so_g"]
for cc, ty, g, d in ((90, "*bf16", 4, 64), (90, "*bf16", 6, 128), (80, "*fp16", 4, 64), (75, "*fp16", 3, 128)):
    for split in (False, True):
        types = [ty, ty, ty, "*i64", "*fp32" if split else ty, "*fp32", "fp32", "i32", "i32"] + ["i32"] * 10
        const = dict(G=g, G_PAD=16, D=d, BLOCK=da.BLOCK_N, IEEE=False, INTERP_LEN=0, SPLIT=split)
        sig = {**dict(zip(names, types)), **{k: "constexpr" for k in const}}
        attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if n not in ("scale", "length", "chunk")}
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs),
                           target=GPUTarget("cuda", cc, 32), options={"num_warps": 4})
        assert k.asm["cubin"] and ("mma" in k.asm["ptx"]) == (cc >= 80), (cc, ty)
    const = dict(S=5, G=g, G_PAD=16, D=d)
    sig = {**dict(zip(cnames, ["*fp32", "*fp32", ty] + ["i32"] * 7)), **{k: "constexpr" for k in const}}
    k = triton.compile(ASTSource(fn=comb, signature=sig, constexprs=const), target=GPUTarget("cuda", cc, 32),
                       options={"num_warps": 4})
    assert k.asm["cubin"], (cc, ty)
    print("ok", cc, ty, d)
'''


def test_compiles_for_the_gpus_it_targets(tmp_path):
    """The kernels (one pass, split, combine) as a real launch compiles them (not the interpreter), for an H100/H200 (sm_90, bf16), an A100
    (sm_80) and a T4 (sm_75, fp16, the paper's card): ptxas accepts it; the products run on tensor cores from
    sm_80 on (Triton lowers them to FMAs on sm_75)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    r = subprocess.run([sys.executable, "-c", _COMPILE], cwd=Path(__file__).resolve().parents[1], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("ok ") == 4


def test_self_check_turns_a_wrong_kernel_off(monkeypatch, caplog):
    """Before its first use the runner checks the kernel against SDPA; one that disagrees (or raises) is turned
    off with one warning, the step runs on SDPA, and the engine's stats say which attention runs."""
    from model_server.engines.fast import decode_attn

    assert decode_attn.self_check(torch.device("cpu"), torch.float32, 2, 2, 16, 0.25) is None
    real = decode_attn.decode_attention
    monkeypatch.setattr(decode_attn, "decode_attention", lambda *a, **k: real(*a, **k) * 1.5)
    assert "differs from SDPA" in decode_attn.self_check(torch.device("cpu"), torch.float32, 2, 2, 16, 0.25)
    monkeypatch.setattr(decode_attn, "decode_attention", lambda *a, **k: 1 / 0)
    assert decode_attn.self_check(torch.device("cpu"), torch.float32, 2, 2, 16, 0.25).startswith("ZeroDivisionError")

    eng = FastEngine(_tiny("llama"), [EOS], device="cpu", max_batch=2, max_seq_len=32, decode_attn=True)
    r = eng.runner
    assert eng.stats().extra["decode_attn_kernel"] == 1.0
    with torch.inference_mode(), caplog.at_level("WARNING"):
        r.in_ids[:2] = torch.tensor([5, 9])
        r.in_pos[:2] = torch.tensor([3, 0])
        one = r.decode_forward(2, 32).clone()
        r.decode_attn = False
        two = r.decode_forward(2, 32)
    assert torch.equal(one, two) and r.decode_attn_error.startswith("ZeroDivisionError")
    assert eng.stats().extra["decode_attn_kernel"] == 0.0
    assert sum("decode attention kernel off" in m for m in caplog.messages) == 1


def test_serve_with_the_kernel(tiny_model_dir, monkeypatch):
    """``MODEL_SERVER_FAST_DECODE_ATTN=1`` reaches ``serve --engine fast``: ``/info`` says the kernel runs, and
    greedy completions are the same as a server's without it."""
    import json
    import urllib.request

    from tests.conftest import start_model_server

    def complete(url: str, prompt: str) -> str:
        body = json.dumps({"model": "m", "prompt": prompt, "max_tokens": 16, "temperature": 0}).encode()
        req = urllib.request.Request(url + "/v1/completions", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            return json.load(r)["choices"][0]["text"]

    prompts = ["def main(", "the quick brown fox", "1, 2, 3,"]
    with start_model_server(tiny_model_dir, "--engine", "fast", "--max-batch", "4") as plain:
        want = [complete(plain.url, p) for p in prompts]
    monkeypatch.setenv("MODEL_SERVER_FAST_DECODE_ATTN", "1")
    with start_model_server(tiny_model_dir, "--engine", "fast", "--max-batch", "4") as srv:
        got = [complete(srv.url, p) for p in prompts]
        with urllib.request.urlopen(srv.url + "/info", timeout=10) as r:
            info = json.load(r)
    assert info["decode_attn_kernel"] is True and info["engine"] == "fast"
    assert got == want and all(want)
