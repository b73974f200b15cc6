"""A prefill's rotary as one Triton kernel (``engines/fast/rope_prefill.py``, ``MODEL_SERVER_FAST_PREFILL_ROPE``),
run by Triton's interpreter on CPU: the bits of the fused op (:func:`fused.rope`) in fp32 and bf16 for any prompt
and token counts, a fast engine prefilling with it still gives ``model.generate``'s greedy tokens, the switch, and
the kernel compiles for sm_90 (the interpreter runs its Python, not Triton's compiler)."""
from __future__ import annotations


import pytest
import torch

from model_server.engines.fast import rope_prefill as rp
from model_server.engines.fast.fused import rope
from model_server.engines.fast.rope_kv import available
from model_server.switches import SwitchValueError

from tests.fast_engine_support import _greedy_vs_generate
from tests.triton_compile_support import compile_lines

pytestmark = pytest.mark.skipif(not available(16), reason="Triton is a declared dependency; CI installs it")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n,t,heads,kv,d", [(3, 5, 4, 2, 16), (2, 19, 8, 8, 32), (1, 1, 4, 1, 16)])
def test_gives_the_bits_of_the_fused_op(dtype, n, t, heads, kv, d):
    g = torch.Generator().manual_seed(5)
    qkv = torch.randn(n, t, (heads + 2 * kv) * d, generator=g).to(dtype)       # the merged projection's output
    cos = torch.randn(24, d, generator=g).to(dtype)
    sin = torch.randn(24, d, generator=g).to(dtype)
    q, k, _ = qkv.split([heads * d, kv * d, kv * d], dim=-1)
    want_q, want_k = rope(q.view(n, t, heads, d).transpose(1, 2), k.view(n, t, kv, d).transpose(1, 2),
                          cos[:t][None, None], sin[:t][None, None])
    got_q, got_k = rp.rope_prefill(q.view(n, t, heads, d), k.view(n, t, kv, d), cos, sin)
    assert got_q.is_contiguous() and got_k.shape == (n, t, kv, d)
    assert torch.equal(got_q.transpose(1, 2), want_q) and torch.equal(got_k.transpose(1, 2), want_k)


def test_refuses_operands_that_do_not_fit() -> None:
    q, k = torch.randn(2, 4, 4, 16), torch.randn(2, 4, 2, 16)
    with pytest.raises(ValueError, match="do not fit"):
        rp.rope_prefill(q, k, torch.randn(3, 16), torch.randn(3, 16))            # fewer positions than tokens
    with pytest.raises(ValueError, match="do not fit"):
        rp.rope_prefill(q.transpose(2, 3), k, torch.randn(8, 16), torch.randn(8, 16))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_engine_prefilling_with_the_kernel_matches_generate(arch, monkeypatch):
    calls = []
    real = rp.rope_prefill
    monkeypatch.setattr("model_server.engines.fast.prefill.rope_prefill",
                        lambda *a: calls.append(a[0].shape) or real(*a))
    monkeypatch.setenv(rp.SWITCH, "triton")
    toks, refs, runner = _greedy_vs_generate(arch, 7)
    assert runner.prefill_rope and calls and toks == refs


def test_the_switch(monkeypatch):
    monkeypatch.delenv(rp.SWITCH, raising=False)
    assert rp.mode() == "compiled" and not rp.usable(64)       # the fused op serves until measured on a GPU
    monkeypatch.setenv(rp.SWITCH, "triton")
    assert rp.usable(64) and not rp.usable(48)                 # a power-of-two head size only
    monkeypatch.setenv(rp.SWITCH, "fast")
    with pytest.raises(SwitchValueError, match="MODEL_SERVER_FAST_PREFILL_ROPE must be one of compiled, triton"):
        rp.mode()


COMPILE_SM90 = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from model_server.engines.fast import rope_kv, rope_prefill as rp
rope_kv.available(64)                 # imports Triton into rope_kv (no GPU here: it answers False)
fn = rp._jitted()
names = ["q_ptr", "k_ptr", "qo_ptr", "ko_ptr", "cos_ptr", "sin_ptr", "T", "t_blocks", "sq_n", "sq_t", "sk_n", "sk_t",
         "stride_cs"]
for dt in ("bf16", "fp16"):
    types = ["*" + dt] * 6 + ["i32"] * 7
    const = dict(H=32, KV=8, D=64, BLOCK=rp.BLOCK_T, BF16=dt == "bf16")
    sig = dict(zip(names, types), **{k: "constexpr" for k in const})
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": 4})
    print(dt, "st.global" in k.asm["ptx"])
"""


def test_the_kernel_compiles_for_sm90(tmp_path):
    lines = compile_lines(COMPILE_SM90, tmp_path)
    assert lines[:2] == ["bf16 True", "fp16 True"], lines
