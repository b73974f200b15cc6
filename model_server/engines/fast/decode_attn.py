"""Decode attention as one Triton kernel: each row's query heads over its own slot's cached keys 0..pos.

A decode step's attention went through ``F.scaled_dot_product_attention`` with an additive mask; on an H200
that is cuDNN's flash forward kernel, built for long query blocks: with one query per row (four per kv
head under GQA) it took 7.1 us per layer at batch 1 and 24 us at batch 64 (length 192), where the K/V
it reads would take ~5 us at the card's bandwidth (docs/benchmarks.md, "Rotary and K/V writes as one
kernel": 114 of a step's 1,057 kernel-us at batch 1, 388 of 1,469 at 64). Here one program per (row, kv
head) loads that head's query group once, streams the row's keys and values up to its position in blocks
(online softmax, fp32 accumulators, the scores' products on tensor cores), and writes the group's outputs;
no mask tensor is made, and keys past a row's position are never read. With few rows and a long context the
key range is split over more programs and a second kernel combines the parts by their log-sum-exp (as
flash-decoding does), so a batch of one still spreads over the card (:func:`choose_splits`).

It is not bit-identical to SDPA (both accumulate in fp32, in different orders); tests compare it with SDPA
within tolerances and check that greedy output still equals ``model.generate``. Owns the kernel and its
launch; the runner decides when to use it (``decode_attn``). ``TRITON_INTERPRET=1`` runs it on CPU (tests).
"""
from __future__ import annotations

import functools
import os
from typing import Any

import torch

from . import rope_kv as _triton_gate

triton: Any = None                   # set by available(): imported at first use (cold start, CPU installs)
tl: Any = None
_kernel: Any = None
_combine: Any = None
BLOCK_N = 64                         # keys per iteration


def available(head_dim: int) -> bool:
    """Triton importable, a CUDA device or ``TRITON_INTERPRET=1``, and a power-of-two head size >= 16."""
    global triton, tl
    ok = head_dim >= 16 and _triton_gate.available(head_dim)
    triton, tl = _triton_gate.triton, _triton_gate.tl
    return ok


def on_by_default(device_type: str, dtype: torch.dtype, head_dim: int) -> bool:
    """Whether the runner uses the kernel when not told (``decode_attn=None``): a CUDA bf16/fp16 model whose head
    size it takes, with Triton importable (on an H200 it beats SDPA at 1 and 64 rows, docs/benchmarks.md)."""
    return device_type == "cuda" and dtype in (torch.bfloat16, torch.float16) and available(head_dim)


def _decode_attn_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, o_ptr, lse_ptr, scale, length, chunk,
                        sq_b, sq_h, sq_g, sk_b, sk_h, sk_l, so_b, so_h, so_s, so_g,
                        G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr,
                        IEEE: tl.constexpr, INTERP_LEN: tl.constexpr, SPLIT: tl.constexpr):
    """Program (row, kv head, split): softmax(q k^T * scale) v over the keys of slot ``row`` that are at or before
    ``pos[row]``, below ``length`` and in this split's ``chunk`` of positions, for the ``G`` query heads of the group
    (padded to ``G_PAD`` rows for the tensor-core products). ``IEEE``: the products in fp32 (fp32 models, and the
    interpreter); else q k^T on the model's dtype and p rounded to it for p v, as flash attention does; the softmax
    and the sums are fp32 either way. ``SPLIT``: write this split's normalized output (fp32) and its log-sum-exp
    (-inf for a split past the row's keys) for :func:`_combine_kernel`; else the final output."""
    row = tl.program_id(0).to(tl.int64)          # int64 offsets: a long cache's slot stride x rows passes 2**31
    h = tl.program_id(1).to(tl.int64)
    sp = tl.program_id(2)
    g = tl.arange(0, G_PAD)
    d = tl.arange(0, D)
    gmask = g < G
    q = tl.load(q_ptr + row * sq_b + h * sq_h + g[:, None] * sq_g + d[None, :], mask=gmask[:, None], other=0.0)
    lo = sp * chunk
    hi = tl.minimum(tl.minimum(tl.load(pos_ptr + row) + 1, length), lo + chunk)
    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D], tl.float32)
    kbase = k_ptr + row * sk_b + h * sk_h
    vbase = v_ptr + row * sk_b + h * sk_h
    # The loop covers [lo, hi). Triton's CPU interpreter cannot take a loop bound that is a tensor, so there it
    # runs over every block below INTERP_LEN (= length); blocks outside [lo, hi) are fully masked and change
    # nothing (alpha = 1, p = 0): the same result.
    for start in range(lo if INTERP_LEN == 0 else 0, hi if INTERP_LEN == 0 else INTERP_LEN, BLOCK):
        n = start + tl.arange(0, BLOCK)
        nmask = (n >= lo) & (n < hi)
        k = tl.load(kbase + n[:, None] * sk_l + d[None, :], mask=nmask[:, None], other=0.0)
        if IEEE:
            s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = tl.where(nmask[None, :], s * scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)    # a block with no key yet: exp(-inf) = 0, not NaN
        alpha = tl.exp(m_i - m_ref)
        p = tl.exp(s - m_ref[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(vbase + n[:, None] * sk_l + d[None, :], mask=nmask[:, None], other=0.0)
        if IEEE:
            pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    dst = o_ptr + row * so_b + h * so_h + sp * so_s + g[:, None] * so_g + d[None, :]
    if SPLIT:
        tl.store(dst, out, mask=gmask[:, None])
        lse = tl.where(l_i > 0, m_i + tl.log(tl.where(l_i > 0, l_i, 1.0)), float("-inf"))
        tl.store(lse_ptr + ((row * tl.num_programs(1) + h) * tl.num_programs(2) + sp) * G_PAD + g, lse)
    else:
        tl.store(dst, out.to(o_ptr.dtype.element_ty), mask=gmask[:, None])


def _combine_kernel(part_ptr, lse_ptr, o_ptr, sp_b, sp_h, sp_s, sp_g, so_b, so_h, so_g,
                    S: tl.constexpr, G: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr):
    """Program (row, kv head): the splits' outputs weighted by exp(their log-sum-exp), i.e. the softmax over all
    the row's keys (split 0 always holds key 0, so the running maximum is finite from the first split on)."""
    row = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    g = tl.arange(0, G_PAD)
    d = tl.arange(0, D)
    gmask = g < G
    m = tl.full([G_PAD], float("-inf"), tl.float32)
    den = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, D], tl.float32)
    for s in tl.static_range(S):
        lse = tl.load(lse_ptr + ((row * tl.num_programs(1) + h) * S + s) * G_PAD + g)
        o = tl.load(part_ptr + row * sp_b + h * sp_h + s * sp_s + g[:, None] * sp_g + d[None, :],
                    mask=gmask[:, None], other=0.0)
        m_new = tl.maximum(m, lse)
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        a = tl.exp(m - m_ref)
        w = tl.exp(lse - m_ref)
        den = den * a + w
        acc = acc * a[:, None] + w[:, None] * o
        m = m_new
    out = acc / tl.where(den > 0, den, 1.0)[:, None]
    tl.store(o_ptr + row * so_b + h * so_h + g[:, None] * so_g + d[None, :], out.to(o_ptr.dtype.element_ty),
             mask=gmask[:, None])


def choose_splits(rows: int, n_kv: int, length: int, n_sm: int) -> int:
    """Splits of the key range per (row, kv head): 1 when the rows' programs already fill the card's ``n_sm``
    multiprocessors or the range is under 4 key blocks; else enough programs to fill it, at least 2 blocks each,
    at most 16 splits (flash-decoding's split over keys, for few rows with long contexts)."""
    blocks = -(-length // BLOCK_N)
    if rows * n_kv >= n_sm or blocks < 4:
        return 1
    return max(1, min(16, blocks // 2, -(-n_sm // (rows * n_kv))))


@functools.lru_cache(maxsize=8)
def _sm_count(device: torch.device) -> int:
    """Multiprocessors of ``device`` (an H100/H200's 132 elsewhere, so CPU tests split as the card would)."""
    if device.type != "cuda":
        return 132
    return int(torch.cuda.get_device_properties(device).multi_processor_count)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor,
                     length: int, scale: float, splits: int | None = None) -> torch.Tensor:
    """``q [b, KV, G, D]`` (last dim contiguous), caches ``[slots, KV, max_len, D]`` (row i reads slot i),
    ``pos [b]`` int64: row i attends keys ``0..pos[i]`` that are also ``< length``. Returns ``[b, KV, G, D]``
    in q's dtype (what SDPA with the causal-by-position mask gives, up to rounding). ``splits``: how many parts
    of the key range run as separate programs, combined by a second kernel (None: :func:`choose_splits`)."""
    global _kernel, _combine
    if _kernel is None:
        _kernel, _combine = triton.jit(_decode_attn_kernel), triton.jit(_combine_kernel)
    b, kv, g, d = q.shape
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride() != k_cache.stride():
        raise ValueError("decode_attention needs contiguous heads and same-layout K/V caches")
    n_split = choose_splits(b, kv, length, _sm_count(q.device)) if splits is None else max(1, int(splits))
    blocks = -(-length // BLOCK_N)
    chunk = -(-blocks // n_split) * BLOCK_N
    n_split = -(-length // chunk)
    out = torch.empty(b, kv, g, d, dtype=q.dtype, device=q.device)
    g_pad = max(16, 1 << (g - 1).bit_length())
    if n_split > 1:
        part = torch.empty(b, kv, n_split, g, d, dtype=torch.float32, device=q.device)
        lse = torch.empty(b, kv, n_split, g_pad, dtype=torch.float32, device=q.device)
    else:
        part, lse = out.unsqueeze(2), out          # (lse unused)
    interp = os.environ.get("TRITON_INTERPRET") == "1"      # (its bf16 products are not reliable: fp32 there)
    _kernel[(b, kv, n_split)](
        q, k_cache, v_cache, pos, part, lse, float(scale), int(length), int(chunk),
        q.stride(0), q.stride(1), q.stride(2), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        part.stride(0), part.stride(1), part.stride(2), part.stride(3),
        G=g, G_PAD=g_pad, D=d, BLOCK=BLOCK_N, IEEE=q.dtype == torch.float32 or interp,
        INTERP_LEN=int(length) if interp else 0, SPLIT=n_split > 1)
    if n_split > 1:
        _combine[(b, kv)](part, lse, out, part.stride(0), part.stride(1), part.stride(2), part.stride(3),
                          out.stride(0), out.stride(1), out.stride(2), S=n_split, G=g, G_PAD=g_pad, D=d)
    return out


def sdpa_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, pos: torch.Tensor, length: int,
                   scale: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """What :func:`decode_attention` computes, by SDPA with a position mask, in ``dtype`` (float32: the
    reference the kernel is checked against; the model's dtype: what the engine runs without the kernel)."""
    b = q.shape[0]
    keys = torch.arange(length, device=q.device)
    mask = torch.where(keys[None, :] <= pos[:, None], 0.0, float("-inf")).to(dtype)[:, None, None, :]
    return torch.nn.functional.scaled_dot_product_attention(
        q.to(dtype), k_cache[:b, :, :length].to(dtype), v_cache[:b, :, :length].to(dtype), attn_mask=mask, scale=scale)


def self_check(device: torch.device, dtype: torch.dtype, n_kv: int, group: int, head_dim: int,
               scale: float) -> str | None:
    """Run the kernel once on random inputs of a model's shapes against SDPA in fp32: None if it agrees within
    the dtype's rounding, else why not (one line). The runner calls it before the first step that would use it."""
    if not available(head_dim):
        return f"needs Triton, a CUDA device (or TRITON_INTERPRET=1) and a power-of-two head size >= 16 ({head_dim})"
    try:
        gen = torch.Generator(device=device).manual_seed(0)
        b, length = 3, 80
        q = torch.randn(b, n_kv, group, head_dim, generator=gen, device=device).to(dtype)
        kc = torch.randn(b, n_kv, length, head_dim, generator=gen, device=device).to(dtype)
        vc = torch.randn(b, n_kv, length, head_dim, generator=gen, device=device).to(dtype)
        pos = torch.tensor([0, 37, length - 1], device=device)
        ref = sdpa_reference(q, kc, vc, pos, length, scale)
        err = max(float((decode_attention(q, kc, vc, pos, length, scale, splits=n).float() - ref).abs().max())
                  for n in (1, 2))                  # one pass, and the key range split in two and combined
    except Exception as exc:  # noqa: BLE001 - any failure: the caller keeps SDPA
        return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    return None if err <= tol else f"differs from SDPA by {err:.3g} (tolerance {tol:g})"

