"""Rotary embedding and the K/V cache write of a decode step in one kernel (Triton).

A decode step's attention input, per layer, was three kernels after the merged q/k/v GEMM: the fused
rotary op (q and k), then one indexed write each for K and V into the cache. At batch 1 a kernel inside
a CUDA graph costs a few microseconds whatever it does, so 32 of a step's ~280 kernels were cache
writes (docs/benchmarks.md, "Merged projections, and what bounds a decode step"). Here one program per
(row, head) reads its head from the merged GEMM output ``[b, (H + 2 KV) * D]``, rotates q and k heads
and writes q to ``q_out [b, H, D]`` and k and v straight into the cache at (slot, kv head, position).

It computes what the eager ops compute, rounding where they round: ``x * cos`` and
``rotate_half(x) * sin`` are each rounded to the model's dtype, then their sum (as eager PyTorch does
elementwise, and as the compiled op does with ``emulate_precision_casts``); the writes are copies.
The input may also be an INT4 GEMM's split-K partial sums ``[S, b, (H + 2 KV) * D]`` (fp32;
``MODEL_SERVER_INT4_SPLIT_SUM_IN_CONSUMER``): each value is then their sum in split order rounded to the model's
dtype first, the bits the GEMM's sum kernel would have written.

Owns the kernel and its launch; the runner decides when to use it (CUDA, merged q/k/v, fused ops on) and
falls back to the separate ops otherwise. ``TRITON_INTERPRET=1`` runs it on CPU (tests).
"""
from __future__ import annotations

import os
from typing import Any

import torch

triton: Any = None                   # imported at first use: CPU-only installs have none, and the
tl: Any = None                       # interpreter must be chosen before Triton's own import
_kernel: Any = None


def available(head_dim: int) -> bool:
    """Triton importable, a CUDA device or ``TRITON_INTERPRET=1``, and a power-of-two head size."""
    global triton, tl
    if head_dim < 2 or head_dim & (head_dim - 1):
        return False
    if triton is None:
        try:
            import triton as triton_mod
            import triton.language as tl_mod
        except ImportError:
            return False
        triton, tl = triton_mod, tl_mod
    return os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()


def _round(x, BF16: tl.constexpr, out_ty: tl.constexpr):
    """fp32 ``x`` rounded to the model's dtype, kept in fp32 (bf16 by hand: nearest, ties to even, on the bits)."""
    if BF16:
        xb = x.to(tl.int32, bitcast=True)
        return ((xb + 0x7FFF + ((xb >> 16) & 1)) & -65536).to(tl.float32, bitcast=True)
    return x.to(out_ty).to(tl.float32)


def _load_sum(ptrs, stride_split, SPLIT: tl.constexpr, BF16: tl.constexpr, out_ty: tl.constexpr):
    """The input at ``ptrs`` in fp32: one load, or SPLIT fp32 partials added in split order and rounded."""
    x = tl.load(ptrs).to(tl.float32)
    if SPLIT > 1:
        for i in tl.static_range(1, SPLIT):
            x += tl.load(ptrs + i * stride_split)
        x = _round(x, BF16, out_ty)
    return x


def _rope_kv_kernel(qkv_ptr, cos_ptr, sin_ptr, pos_ptr, slot_ptr, q_ptr, k_ptr, v_ptr,
                    stride_row, stride_split, stride_cs, stride_ks, stride_kh, stride_kp,
                    H: tl.constexpr, KV: tl.constexpr, D: tl.constexpr, BF16: tl.constexpr, SPLIT: tl.constexpr):
    """Program (row, head): head < H rotates q into ``q_out``; else kv head ``head - H``: k rotated and v
    copied into the caches at (slot[row], kv head, pos[row]). ``BF16``: round to bf16 by hand (nearest,
    ties to even, on the bits), as torch does and whatever rounding a Triton backend's cast uses. ``SPLIT`` > 1:
    ``qkv_ptr`` holds that many fp32 partial sums, ``stride_split`` apart (module docstring)."""
    row = tl.program_id(0)
    head = tl.program_id(1)
    half: tl.constexpr = D // 2
    d = tl.arange(0, D)
    pos = tl.load(pos_ptr + row)
    base = qkv_ptr + row * stride_row
    out_ty: tl.constexpr = q_ptr.dtype.element_ty
    c = tl.load(cos_ptr + pos * stride_cs + d).to(tl.float32)
    s = tl.load(sin_ptr + pos * stride_cs + d).to(tl.float32)
    # rotate_half(x)[d] = -x[d + half] for d < half, x[d - half] otherwise
    partner = tl.where(d < half, d + half, d - half)
    sign = tl.where(d < half, -1.0, 1.0)
    is_q = head < H
    kh = tl.where(is_q, 0, head - H)
    src = base + tl.where(is_q, head, H + kh) * D
    x = _load_sum(src + d, stride_split, SPLIT, BF16, out_ty)
    r = _load_sum(src + partner, stride_split, SPLIT, BF16, out_ty) * sign
    y = _round(_round(x * c, BF16, out_ty) + _round(r * s, BF16, out_ty), BF16, out_ty)
    if is_q:
        tl.store(q_ptr + (row * H + head) * D + d, y.to(out_ty))
    else:
        slot = tl.load(slot_ptr + row)
        dst = slot * stride_ks + kh * stride_kh + pos * stride_kp + d
        tl.store(k_ptr + dst, y.to(out_ty))
        if SPLIT > 1:
            tl.store(v_ptr + dst, _load_sum(base + (H + KV + kh) * D + d, stride_split, SPLIT, BF16, out_ty).to(out_ty))
        else:                                                   # a copy, as before partials
            tl.store(v_ptr + dst, tl.load(base + (H + KV + kh) * D + d))


def _jitted() -> Any:
    """The kernel, ``triton.jit`` once at first use (its helpers first: the kernel's calls find them jitted)."""
    global _kernel, _round, _load_sum
    if _kernel is None:
        _round, _load_sum = triton.jit(_round), triton.jit(_load_sum)
        _kernel = triton.jit(_rope_kv_kernel)
    return _kernel


def rope_kv_write(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pos: torch.Tensor,
                  slots: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, n_heads: int,
                  n_kv: int) -> torch.Tensor:
    """``qkv [b, (H + 2 KV) * D]`` (rows contiguous; or fp32 split-K partials ``[S, b, (H + 2 KV) * D]``),
    ``cos``/``sin [max_len, D]``, ``pos``/``slots [b]`` int64, caches ``[slots, KV, max_len, D]`` (last dim
    contiguous): writes rotated k and v into the caches and returns rotated q ``[b, H, D]`` in the caches' dtype."""
    parts = qkv if qkv.dim() == 3 else qkv[None]
    b = parts.shape[1]
    d = k_cache.shape[-1]
    q_out = torch.empty(b, n_heads, d, dtype=k_cache.dtype, device=qkv.device)
    _jitted()[(b, n_heads + n_kv)](
        parts, cos, sin, pos, slots, q_out, k_cache, v_cache,
        parts.stride(1), parts.stride(0), cos.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        H=n_heads, KV=n_kv, D=d, BF16=k_cache.dtype == torch.bfloat16, SPLIT=parts.shape[0])
    return q_out
