"""A small-rows (GEMV-style) Triton kernel for ``model_server/int4.py``'s INT4 linears: decode steps of 1..16 rows.

The GEMM kernel of :mod:`model_server.int4_triton` streams one K-block per loop iteration and reads the scales of a
block outside its software pipeline, so on these small matrices each program waits a memory latency per K-block
(6-23 us per call on an H200 where the 4-bit bytes need 0.5-4 us). This kernel reads the SAME layout
(:func:`int4_triton.pack_int4`, scales/zeros ``[K / G, N]``) but gives each program a strip of ``BLOCK_N`` output
columns and ``NB`` K-blocks per iteration (a 3-D tile ``[NB, BLOCK_N, BK / 2]`` of packed bytes), with every load of
the loop (weights, scales, zeros, activations) in the software pipeline (``tl.range(num_stages=...)``), so each SM
has several tiles of bytes in flight; split K (``split`` programs along K, fp32 partial sums, the GEMM module's sum
kernel) lets narrow matrices fill the SMs. Two ways to multiply the few rows (``GemvConfig.dot``):

* CUDA cores (``dot=False``, rows padded to ``block_m`` <= 16, a static loop over them): ``q`` as exact fp32 from its
  bits (``0x4B000000 | q`` is the float ``2**23 + q``; one subtraction, no int -> float conversion), then per K-block
  ``acc += scale * sum(q * x) + (zero - 8 * scale) * sum(x)`` (fp32 throughout);
* tensor cores (``dot=True``, rows padded to ``block_m`` >= 16): ``w = q * scale + zero - 8 * scale`` in fp32,
  rounded to the activation dtype, then a batched ``tl.dot`` over the tile's K-blocks (fp32 accumulation).

Both compute ``y[m, n] = sum_k x[m, k] * ((q[n, k] - 8) * scale[k // G, n] + zero[k // G, n])`` (int4.py's math).

Owns: the kernel, its launch configuration (:class:`GemvConfig`, :func:`choose_gemv_config`) and the wrapper
:func:`int4_gemv_mm`. Must NOT: own a layout (int4_triton does) or decide which kernel a layer uses (int4.py does).
Runs on CUDA (bf16 / fp16) and, for tests, in Triton's CPU interpreter (``TRITON_INTERPRET=1``, fp32 / fp16).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch

from model_server import int4_triton

tl: Any = None                       # bound at first use (int4_triton imports Triton then); annotations are strings

MAX_ROWS = 16                        # rows this kernel is meant for (dot=True also accepts up to block_m rows)


@dataclass(frozen=True)
class GemvConfig:
    block_n: int                     # output columns per program
    nb: int                          # K-blocks per loop iteration
    block_m: int                     # rows, padded (power of two; >= 16 with dot)
    split: int                       # programs along K
    num_stages: int
    num_warps: int = 4
    dot: bool = False                # tensor cores (else CUDA cores)
    prefetch: bool = True            # load the next iteration's scales/zeros one iteration ahead


# Per (rows bucket, N, K) configs measured fastest on the device (benchmarks/int4_kernels.py prints this table from
# its sweep: "Configs to encode"); shapes not listed use the rule in choose_gemv_config. Empty until a sweep has run.
TUNED: dict[tuple[int, int, int], GemvConfig] = {}


def rows_bucket(m: int) -> int:
    """The row count a tuned config is measured at: 1, 8 (2..8 rows), 16, 64; a config for a bucket fits its rows."""
    return 1 if m == 1 else 8 if m <= 8 else 16 if m <= 16 else 64


def choose_gemv_config(m: int, n: int, k: int, bk: int, num_sms: int) -> GemvConfig:
    """:data:`TUNED` for this shape and rows bucket, else a rule: one row on CUDA cores, more on tensor cores with one
    K-block of a 16-column strip per warp (the tiles with the fewest instructions per weight when compiled for sm_90:
    ~9.5, against 13-33 for CUDA cores at 2-8 rows and 17-42 for wider tensor-core strips); split K while the strips do
    not fill the SMs twice and each split keeps >= 2 iterations."""
    tuned = TUNED.get((rows_bucket(m), n, k))
    if tuned is not None and tuned.block_m >= m:
        return tuned
    dot = m > 1
    bm = max(16, _pow2(m)) if dot else 1
    bn, nb = 16, 4
    blocks = k // bk
    split = 1
    while -(-n // bn) * split < 2 * num_sms and blocks >= 4 * split * nb:
        split *= 2
    return GemvConfig(bn, nb, bm, split, 4, 4, dot)


def _pow2(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


def _gemv_kernel(x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, M, N, KBLOCKS, stride_xm, stride_wn, stride_ym, stride_ys,
                 ITERS: tl.constexpr, GROUP: tl.constexpr, BK: tl.constexpr, HALF: tl.constexpr,
                 BLOCK_N: tl.constexpr, NB: tl.constexpr, BLOCK_M: tl.constexpr, STAGES: tl.constexpr,
                 DOT: tl.constexpr, PREFETCH: tl.constexpr, IEEE: tl.constexpr):
    """Program (pid_n, pid_k): columns [pid_n * BLOCK_N, +BLOCK_N), K-blocks [pid_k * ITERS * NB, +ITERS * NB)
    (masked past KBLOCKS). Writes y (or split pid_k's fp32 partial) transposed from its [BLOCK_N, BLOCK_M] tile."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_b = tl.arange(0, NB)
    offs_h = tl.arange(0, HALF)
    offs_m = tl.arange(0, BLOCK_M)
    n_mask = offs_n < N
    w_base = w_ptr + offs_n[None, :, None] * stride_wn + offs_b[:, None, None] * HALF + offs_h[None, None, :]
    kb0 = pid_k * ITERS * NB
    if DOT:
        acc3 = tl.zeros((NB, BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    # PREFETCH: the scales and zeros of the first iteration here; each iteration then loads the next one's before its
    # own work, so their latency hides behind a whole iteration (Triton's pipeline leaves these loads synchronous)
    if PREFETCH:
        kb = kb0 + offs_b
        sz_off = (kb * BK // GROUP)[:, None] * N + offs_n[None, :]            # [NB, BLOCK_N]
        sz_mask = (kb < KBLOCKS)[:, None] & n_mask[None, :]
        s_next = tl.load(s_ptr + sz_off, mask=sz_mask, other=0.0)
        z_next = tl.load(z_ptr + sz_off, mask=sz_mask, other=0.0)
    for it in tl.range(0, ITERS, num_stages=STAGES):
        kb = kb0 + it * NB + offs_b                                          # [NB] K-block indices
        b_mask = kb < KBLOCKS
        if PREFETCH:
            s = s_next.to(tl.float32)
            zz = z_next.to(tl.float32) - 8.0 * s
            kb_next = kb + NB
            sz_off = (kb_next * BK // GROUP)[:, None] * N + offs_n[None, :]
            sz_mask = (kb_next < KBLOCKS)[:, None] & n_mask[None, :]
            s_next = tl.load(s_ptr + sz_off, mask=sz_mask, other=0.0)
            z_next = tl.load(z_ptr + sz_off, mask=sz_mask, other=0.0)
        else:
            sz_off = (kb * BK // GROUP)[:, None] * N + offs_n[None, :]
            sz_mask = b_mask[:, None] & n_mask[None, :]
            s = tl.load(s_ptr + sz_off, mask=sz_mask, other=0.0).to(tl.float32)
            zz = tl.load(z_ptr + sz_off, mask=sz_mask, other=0.0).to(tl.float32) - 8.0 * s
        byt = tl.load(w_base + (kb0 + it * NB) * HALF, mask=b_mask[:, None, None] & n_mask[None, :, None], other=0)
        q_lo = ((byt & 15).to(tl.int32) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
        q_hi = ((byt >> 4).to(tl.int32) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
        k_lo = kb[:, None] * BK + offs_h[None, :]                            # [NB, HALF]
        if DOT:
            x_ptrs = x_ptr + offs_m[None, None, :] * stride_xm + k_lo[:, :, None]
            x_mask = b_mask[:, None, None] & (offs_m < M)[None, None, :]
            x_lo = tl.load(x_ptrs, mask=x_mask, other=0.0)                  # [NB, HALF, BLOCK_M]
            x_hi = tl.load(x_ptrs + HALF, mask=x_mask, other=0.0)
            w_lo = (q_lo * s[:, :, None] + zz[:, :, None]).to(x_lo.dtype)  # [NB, BLOCK_N, HALF]
            w_hi = (q_hi * s[:, :, None] + zz[:, :, None]).to(x_lo.dtype)
            if IEEE:
                acc3 = tl.dot(w_lo, x_lo, acc=acc3, input_precision="ieee")
                acc3 = tl.dot(w_hi, x_hi, acc=acc3, input_precision="ieee")
            else:
                acc3 = tl.dot(w_lo, x_lo, acc=acc3)
                acc3 = tl.dot(w_hi, x_hi, acc=acc3)
        else:
            for mi in tl.static_range(BLOCK_M):
                x_mask = b_mask[:, None] & (mi < M)
                x_lo = tl.load(x_ptr + mi * stride_xm + k_lo, mask=x_mask, other=0.0).to(tl.float32)
                x_hi = tl.load(x_ptr + mi * stride_xm + k_lo + HALF, mask=x_mask, other=0.0).to(tl.float32)
                t = tl.sum(q_lo * x_lo[:, None, :] + q_hi * x_hi[:, None, :], axis=2)       # [NB, BLOCK_N]
                xs = tl.sum(x_lo + x_hi, axis=1)                                              # [NB]
                c = tl.sum(t * s + zz * xs[:, None], axis=0)                                  # [BLOCK_N]
                acc += tl.where(offs_m[None, :] == mi, c[:, None], 0.0)
    if DOT:
        acc = tl.sum(acc3, axis=0)
    y_ptr += pid_k * stride_ys
    tl.store(y_ptr + offs_m[None, :] * stride_ym + offs_n[:, None], acc.to(y_ptr.dtype.element_ty),
             mask=(offs_m < M)[None, :] & n_mask[:, None])


@lru_cache(maxsize=None)
def _jitted(interpret: bool) -> Any:
    """``triton.jit`` at first use (TRITON_INTERPRET is read then), one per mode. Not specialized on the row count
    (1..16 rows share one compiled kernel per config)."""
    global tl
    tl = int4_triton.tl
    return int4_triton.triton.jit(_gemv_kernel, do_not_specialize=["M"])


def int4_gemv_mm(x2d: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 group_size: int, config: GemvConfig | None = None) -> torch.Tensor:
    """``y [M, N] = x2d [M, K] @ dequant(W)[N, K]^T`` for few rows, in ``x2d``'s dtype (fp32 accumulation).

    Same arguments as :func:`int4_triton.int4_triton_mm`; ``config`` overrides :func:`choose_gemv_config`.
    ValueError when the rows exceed the config's ``block_m`` or the shapes do not match."""
    if not int4_triton._import_triton():
        raise RuntimeError("Triton is not installed")
    m, k = x2d.shape
    n = packed.shape[0]
    bk = int4_triton.block_k(group_size)
    if packed.shape[1] * 2 != k or k % group_size or scales.shape != (k // group_size, n) \
            or zeros.shape != scales.shape or x2d.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"x {tuple(x2d.shape)} {x2d.dtype}, packed {tuple(packed.shape)}, scales "
                         f"{tuple(scales.shape)}, zeros {tuple(zeros.shape)} do not match group {group_size}")
    if m == 0:
        return x2d.new_empty((0, n))
    cfg = config or choose_gemv_config(m, n, k, bk, int4_triton._num_sms(x2d.device))
    if m > cfg.block_m or (cfg.dot and cfg.block_m < 16) or cfg.block_m & (cfg.block_m - 1):
        raise ValueError(f"{m} rows do not fit block_m {cfg.block_m} (a power of two, >= 16 with dot)")
    x2d = x2d if x2d.stride(1) == 1 else x2d.contiguous()
    kblocks = k // bk
    iters = -(-kblocks // (cfg.split * cfg.nb))
    y = torch.empty((m, n), device=x2d.device, dtype=x2d.dtype)
    part = y if cfg.split == 1 else torch.empty((cfg.split, m, n), device=x2d.device, dtype=torch.float32)
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    kernel = _jitted(interpret)
    grid = (-(-n // cfg.block_n), cfg.split)
    kernel[grid](x2d, packed, scales.contiguous(), zeros.contiguous(), part, m, n, kblocks, x2d.stride(0),
                 packed.stride(0), n, m * n, ITERS=iters, GROUP=group_size, BK=bk, HALF=bk // 2,
                 BLOCK_N=cfg.block_n, NB=cfg.nb, BLOCK_M=cfg.block_m, STAGES=cfg.num_stages, DOT=cfg.dot,
                 PREFETCH=cfg.prefetch, IEEE=x2d.dtype == torch.float32,
                 num_warps=cfg.num_warps)
    if cfg.split > 1:
        sum_kernel = int4_triton._jitted(interpret)[1]
        sum_kernel[(-(-(m * n) // 1024),)](part, y, m * n, SPLIT=cfg.split, BLOCK=1024, PDL=False, num_warps=4)
    return y
