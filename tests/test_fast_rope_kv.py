"""Decode's rotary + K/V cache write as one Triton kernel (``engines/fast/rope_kv.py``), run by Triton's
interpreter on CPU: it must give bit for bit what the separate eager ops give (rotated q, and the K/V cache
after the writes), in fp32 and in bf16 (where the eager ops round after each multiply and after the sum),
and a fast engine using it must still produce ``model.generate``'s greedy tokens."""
from __future__ import annotations


import pytest
import torch

from model_server.engines.fast.fused import rope
from model_server.engines.fast.rope_kv import available, rope_kv_write

from tests.fast_engine_support import _decode_both, _greedy_vs_generate
from tests.triton_compile_support import compile_lines

pytestmark = pytest.mark.skipif(not available(16), reason="Triton is a declared dependency; CI installs it")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads,kv,d", [(4, 2, 16), (8, 8, 32)])
def test_matches_the_separate_ops(dtype, heads, kv, d):
    g = torch.Generator().manual_seed(3)
    b, slots, max_len = 5, 7, 24
    qkv = torch.randn(b, (heads + 2 * kv) * d, generator=g).to(dtype)
    cos = torch.randn(max_len, d, generator=g).to(dtype)
    sin = torch.randn(max_len, d, generator=g).to(dtype)
    pos = torch.tensor([0, 3, 23, 9, 9])
    rows = torch.tensor([6, 0, 2, 4, 1])                   # slots, in any order
    kc = torch.randn(slots, kv, max_len, d, generator=g).to(dtype)
    vc = torch.randn(slots, kv, max_len, d, generator=g).to(dtype)
    kc2, vc2 = kc.clone(), vc.clone()

    q, k, v = qkv.split([heads * d, kv * d, kv * d], dim=-1)
    group = heads // kv
    q_ref, k_ref = rope(q.reshape(b, kv, group, d), k.reshape(b, kv, 1, d),
                        cos[pos][:, None, None, :], sin[pos][:, None, None, :])
    kc[rows, :, pos] = k_ref[:, :, 0]
    vc[rows, :, pos] = v.reshape(b, kv, d)

    q_one = rope_kv_write(qkv, cos, sin, pos, rows, kc2, vc2, heads, kv)
    assert torch.equal(q_one.view(b, kv, group, d), q_ref)
    assert torch.equal(kc2, kc) and torch.equal(vc2, vc)   # the written rows, and nothing else touched


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_split_k_partials_give_the_bits_of_their_rounded_sum(dtype):
    """An INT4 GEMM's fp32 partials (MODEL_SERVER_INT4_SPLIT_SUM_IN_CONSUMER): summed in split order and rounded to
    the model's dtype in the kernel, as the GEMM's sum kernel would have written them."""
    g = torch.Generator().manual_seed(4)
    b, heads, kv, d, slots, max_len = 3, 4, 2, 16, 4, 16
    parts = torch.randn(4, b, (heads + 2 * kv) * d, generator=g) * 3
    cos = torch.randn(max_len, d, generator=g).to(dtype)
    sin = torch.randn(max_len, d, generator=g).to(dtype)
    pos, rows = torch.tensor([1, 15, 4]), torch.tensor([3, 0, 2])
    caches = [torch.randn(slots, kv, max_len, d, generator=g).to(dtype) for _ in range(2)]
    caches += [c.clone() for c in caches]
    summed = parts[0]
    for s in range(1, parts.shape[0]):
        summed = summed + parts[s]
    want = rope_kv_write(summed.to(dtype), cos, sin, pos, rows, caches[0], caches[1], heads, kv)
    got = rope_kv_write(parts, cos, sin, pos, rows, caches[2], caches[3], heads, kv)
    assert got.dtype == dtype and torch.equal(got, want)
    assert torch.equal(caches[2], caches[0]) and torch.equal(caches[3], caches[1])


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_engine_with_the_kernel_matches_generate(arch):
    toks, refs, runner = _greedy_vs_generate(arch, 5, rope_kv=True)
    assert runner.rope_kv and toks == refs
    one, cache_one, two = _decode_both(runner, "rope_kv")   # the decode step bit for bit with and without it
    assert torch.equal(one, two) and torch.equal(cache_one, runner.cache.k)


COMPILE_SM90 = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from model_server.engines.fast import rope_kv as rk
rk.available(64)                      # imports Triton into the module (no GPU here: it answers False)
fn = rk._jitted()
names = ["qkv_ptr", "cos_ptr", "sin_ptr", "pos_ptr", "slot_ptr", "q_ptr", "k_ptr", "v_ptr", "stride_row",
         "stride_split", "stride_cs", "stride_ks", "stride_kh", "stride_kp"]
for dt in ("bf16", "fp16"):
    for split in (1, 4):
        types = ["*fp32" if split > 1 else "*" + dt] + ["*" + dt] * 2 + ["*i64"] * 2 + ["*" + dt] * 3 + ["i32"] * 6
        const = dict(H=32, KV=8, D=64, BF16=dt == "bf16", SPLIT=split)
        sig = dict(zip(names, types), **{k: "constexpr" for k in const})
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const), target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": 4})
        print(dt, split, "st.global" in k.asm["ptx"])
"""


def test_the_kernel_compiles_for_sm90_with_and_without_partials(tmp_path):
    """The interpreter runs the kernel's Python, not Triton's compiler: compile it for an H100/H200 (sm_90, no GPU
    needed) in bf16 and fp16, from one product and from 4 partials, as a launch on the GPU would."""
    lines = compile_lines(COMPILE_SM90, tmp_path)
    assert lines[:4] == ["bf16 1 True", "bf16 4 True", "fp16 1 True", "fp16 4 True"], lines
