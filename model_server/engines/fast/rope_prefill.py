"""The rotary embedding of a prefill pass's q and k as one Triton kernel, for any number of prompts and tokens.

A prefill applies rotary to q and k of every prompt token. Through the engine's fused op (:func:`.fused.rope`,
``torch.compile`` with dynamic shapes) that took 88.8-156 us per layer for a 4,096-token pass on an H100, where the
same function compiled for static shapes took 16.4-16.7 us with the same bits (docs/benchmarks.md, "The prefill's
compiled rotary", ``benchmarks/rope_layout.py``): about 1.2-2.2 ms of a ~18-20 ms pass of 64 prompts. Static
compiles would need one per prefill bucket; this kernel is compiled once (the model's head counts and head size are
its constants) and serves every bucket and eager pass. One program per (prompt, block of ``BLOCK_T`` tokens, head)
reads its head's rows of the q/k/v projection (token-major, as the GEMM wrote them), rotates them and writes q and k
token-major and contiguous (the caller takes head-major views for attention and the K/V cache write).

It rounds where the eager ops round, as :mod:`.rope_kv` does (its ``_round``): ``x * cos`` and ``rotate_half(x) *
sin`` each to the model's dtype, then their sum; so its q and k are the bits of :func:`.fused.rope`.

``MODEL_SERVER_FAST_PREFILL_ROPE`` (:func:`mode`): ``compiled`` (the default: the fused op, as served until this
kernel is measured end to end on a GPU) or ``triton`` (this kernel where Triton runs: CUDA, or ``TRITON_INTERPRET=1``
for tests). Owns the kernel, its launch and the switch; :mod:`.prefill` decides where it runs.
"""
from __future__ import annotations

from typing import Any

import torch

from model_server.switches import choice

from . import rope_kv

SWITCH = "MODEL_SERVER_FAST_PREFILL_ROPE"
MODES = ("compiled", "triton")          # the first is the default
BLOCK_T = 16                            # tokens per program

tl: Any = None                          # triton.language, bound at first use (CPU-only installs have no Triton)
_kernel: Any = None
_round: Any = None                      # rope_kv's jitted rounding helper, the kernel's global


def mode() -> str:
    """``compiled`` or ``triton`` from ``MODEL_SERVER_FAST_PREFILL_ROPE`` (unset: ``compiled``); another value raises
    :class:`model_server.switches.SwitchValueError`. Read when a runner is built."""
    return choice(SWITCH, MODES)


def usable(head_dim: int) -> bool:
    """The switch says ``triton`` and the kernel can run here (:func:`.rope_kv.available`: Triton, a CUDA device or
    the interpreter, a power-of-two head size). Imports Triton only when the switch asks for the kernel."""
    return mode() == "triton" and rope_kv.available(head_dim)


def _rope_rows_kernel(q_ptr, k_ptr, qo_ptr, ko_ptr, cos_ptr, sin_ptr, T, t_blocks, sq_n, sq_t, sk_n, sk_t,
                      stride_cs, H: tl.constexpr, KV: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr,
                      BF16: tl.constexpr):
    """Program (prompt x token block, head): head < H rotates q's head, else k's head ``head - H``; positions are the
    token indices (prompts start at 0). Outputs are contiguous ``[n, T, H or KV, D]``."""
    pid = tl.program_id(0)
    head = tl.program_id(1)
    n = pid // t_blocks
    t = (pid % t_blocks) * BLOCK + tl.arange(0, BLOCK)
    half: tl.constexpr = D // 2
    d = tl.arange(0, D)
    partner = tl.where(d < half, d + half, d - half)          # rotate_half(x)[d] = -x[d + half] below half
    sign = tl.where(d < half, -1.0, 1.0)
    mask = (t < T)[:, None]
    c = tl.load(cos_ptr + t[:, None] * stride_cs + d[None, :], mask=mask, other=0.0).to(tl.float32)
    s = tl.load(sin_ptr + t[:, None] * stride_cs + d[None, :], mask=mask, other=0.0).to(tl.float32)
    out_ty: tl.constexpr = qo_ptr.dtype.element_ty
    if head < H:
        src = q_ptr + n * sq_n + t[:, None] * sq_t + head * D
        dst = qo_ptr + (n * T + t[:, None]) * (H * D) + head * D
    else:
        src = k_ptr + n * sk_n + t[:, None] * sk_t + (head - H) * D
        dst = ko_ptr + (n * T + t[:, None]) * (KV * D) + (head - H) * D
    x = tl.load(src + d[None, :], mask=mask, other=0.0).to(tl.float32)
    r = tl.load(src + partner[None, :], mask=mask, other=0.0).to(tl.float32) * sign[None, :]
    y = _round(_round(x * c, BF16, out_ty) + _round(r * s, BF16, out_ty), BF16, out_ty)
    tl.store(dst + d[None, :], y.to(out_ty), mask=mask)


def _jitted() -> Any:
    """The kernel, ``triton.jit`` once at first use, with rope_kv's jitted rounding helper as its ``_round``; one
    compile serves every token count (strides still specialize, as Triton does, on multiples of 16)."""
    global _kernel, _round, tl
    if _kernel is None:
        rope_kv._jitted()
        _round, tl = rope_kv._round, rope_kv.tl
        # not specialized on the token count (Triton would compile T % 16 == 0 and T == 1 apart from the rest)
        _kernel = rope_kv.triton.jit(_rope_rows_kernel, do_not_specialize=["T", "t_blocks"])
    return _kernel


def rope_prefill(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``q [n, t, H, D]``, ``k [n, t, KV, D]`` (token-major; heads and head size contiguous, e.g. views of the
    merged projection's output), ``cos``/``sin [>= t, D]`` (rows = positions, last dim contiguous): the rotated q and
    k as new contiguous ``[n, t, H, D]`` and ``[n, t, KV, D]`` tensors in q's dtype."""
    n, t, h, d = q.shape
    kv = k.shape[2]
    if k.shape[:2] != (n, t) or k.shape[3] != d or q.stride()[2:] != (d, 1) or k.stride()[2:] != (d, 1) \
            or cos.shape[0] < t or cos.stride(1) != 1 or sin.stride() != cos.stride():
        raise ValueError(f"rope_prefill: q {tuple(q.shape)} {q.stride()}, k {tuple(k.shape)} {k.stride()}, "
                         f"cos {tuple(cos.shape)} do not fit")
    q_out = torch.empty((n, t, h, d), dtype=q.dtype, device=q.device)
    k_out = torch.empty((n, t, kv, d), dtype=k.dtype, device=k.device)
    if n * t == 0:
        return q_out, k_out
    blocks = -(-t // BLOCK_T)
    _jitted()[(n * blocks, h + kv)](q, k, q_out, k_out, cos, sin, t, blocks, q.stride(0), q.stride(1), k.stride(0),
                                    k.stride(1), cos.stride(0), H=h, KV=kv, D=d, BLOCK=BLOCK_T,
                                    BF16=q.dtype == torch.bfloat16)
    return q_out, k_out
