"""Prefill-sized INT4 products as a dequantization pass then cuBLAS: :func:`int4_dequant_mm` and its switch.

A step of hundreds of rows (a prefill pass of up to 2,048 prompt tokens) is bound by tensor-core time, not by the
weight bytes: the fused GEMM of :mod:`model_server.int4_triton` dequantizes every weight once per 128-row tile (16
times at 2,048 rows) and runs ``tl.dot`` with a register operand, while bf16's cuBLAS GEMM reads a plain weight. This
module writes the layer's bf16 (or fp16) weight once into a temporary ``[N, K]`` buffer with a small Triton kernel
(reading :mod:`model_server.int4_triton`'s layout, so no second copy of the weights is kept) and hands the product to
``torch.matmul``. The buffer is a per-call allocation: the CUDA caching allocator (and a CUDA graph's memory pool)
reuses it for the next layer. Its size is the layer's bf16 weight: 64 MiB for the 1B preset's merged gate/up, and
501 MiB for its LM head where a step computes logits for 320 or more rows (the fast engine's prefill computes them
for each prompt's last token only; a full-sequence forward, e.g. transformers' ``generate`` prefill, for every
token, next to logits of the same size).

Owns: the dequantization kernel (:func:`dequantize`), the product (:func:`int4_dequant_mm`) and the row bound from
which a step takes it (:func:`min_rows`, ``MODEL_SERVER_INT4_PREFILL_DEQUANT_ROWS``). Must NOT: choose a layer's kernel
(:mod:`model_server.int4_choice` does) or own the weight layout (:mod:`model_server.int4_triton` does).

Math, per weight (the same values as :func:`model_server.int4_quant.dequantize_groupwise`, rounded once to the
activation dtype)::

    w[n, k] = (q[n, k] - 8) * scale[k // G, n] + zero[k // G, n]      (fp32, then rounded)
"""
from __future__ import annotations

import os
from functools import lru_cache
from typing import Any

import torch

from model_server import int4_triton
from model_server.switches import SwitchValueError, integer

ROWS_SWITCH = "MODEL_SERVER_INT4_PREFILL_DEQUANT_ROWS"
DEFAULT_MIN_ROWS = 320               # steps of at least this many rows dequantize then run cuBLAS; 0 turns it off
BLOCK_N = 64

tl: Any = None                       # triton.language, set at first use (:func:`_jitted`): CPU-only installs have none


@lru_cache(maxsize=1)
def min_rows() -> int:
    """Rows from which an INT4 step dequantizes then multiplies (``MODEL_SERVER_INT4_PREFILL_DEQUANT_ROWS``; unset:
    ``DEFAULT_MIN_ROWS``; ``0``: never). Read once per process (tests clear the cache); a negative value or one that is
    not an integer raises :class:`model_server.switches.SwitchValueError`. The default, from the H100 run of
    2026-12-06 (docs/benchmarks.md, "INT4 at 64 streams, second pass"): per layer of the 1B preset the fused GEMM
    (one-FMA dequantization) took 112.8 us at 256 rows and 204.0 at 512, this path 125.4 and 159.4; the lines cross
    near 300 rows (q/k/v and o cross below 256, gate/up and down near 290-330)."""
    value = integer(ROWS_SWITCH)
    if value is None:
        return DEFAULT_MIN_ROWS
    if value < 0:
        raise SwitchValueError(f"{ROWS_SWITCH} must be 0 (off) or a row count >= 1, got {value}")
    return value


def takes(rows: int) -> bool:
    """Whether a step of ``rows`` rows takes this path (:func:`min_rows`)."""
    bound = min_rows()
    return bound > 0 and rows >= bound


def _dequant_kernel(w_ptr, s_ptr, z_ptr, out_ptr, N, K, stride_wn, GROUP: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr, HALF: tl.constexpr, PAIRED: tl.constexpr):
    """One program: rows ``[pid_n * BLOCK_N, +BLOCK_N)`` of the output, K-block ``program_id(1)`` (``BLOCK_K`` columns,
    whose low nibbles are the first ``HALF`` and high nibbles the second: :mod:`model_server.int4_triton`'s layout).
    PAIRED: ``s_ptr`` holds (scale, zero) as one int32 word in the output's dtype (``z_ptr`` is not read)."""
    pid_n = tl.program_id(0)
    k0 = tl.program_id(1) * BLOCK_K
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_h = tl.arange(0, HALF)
    n_mask = offs_n < N
    b = tl.load(w_ptr + offs_n[:, None] * stride_wn + (k0 // 2 + offs_h)[None, :], mask=n_mask[:, None], other=0)
    g = k0 // GROUP
    ty = out_ptr.dtype.element_ty
    if PAIRED:
        sz = tl.load(s_ptr + g * N + offs_n, mask=n_mask, other=0)
        s = (sz & 0xFFFF).to(tl.int16).to(ty, bitcast=True).to(tl.float32)[:, None]
        z = (sz >> 16).to(tl.int16).to(ty, bitcast=True).to(tl.float32)[:, None]
    else:
        s = tl.load(s_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)[:, None]
        z = tl.load(z_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)[:, None]
    lo = ((b & 15).to(tl.float32) - 8.0) * s + z
    hi = ((b >> 4).to(tl.float32) - 8.0) * s + z
    dst = out_ptr + offs_n[:, None] * K + (k0 + offs_h)[None, :]
    tl.store(dst, lo.to(ty), mask=n_mask[:, None])
    tl.store(dst + HALF, hi.to(ty), mask=n_mask[:, None])


@lru_cache(maxsize=None)
def _jitted(interpret: bool) -> Any:
    """``triton.jit`` at first use, one per mode (TRITON_INTERPRET is read then; :func:`int4_triton._jitted`)."""
    global tl
    tl = int4_triton.tl
    return int4_triton.triton.jit(_dequant_kernel)


def dequantize(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
               dtype: torch.dtype) -> torch.Tensor:
    """The weight ``[N, K]`` in ``dtype`` from :func:`model_server.int4_triton.pack_int4`'s layout and
    :func:`~model_server.int4_triton.split_scales_and_zeros`'s ``[K // G, N]`` scales and zeros (module docstring), or
    ``scales`` as :func:`~model_server.int4_triton.pair_scales_and_zeros`'s int32 words in ``dtype`` (``zeros`` unread)."""
    if not int4_triton._import_triton():
        raise RuntimeError("Triton is not installed")
    n, half_k = packed.shape
    k = half_k * 2
    bk = int4_triton.block_k(group_size)
    if k % group_size or scales.shape != (k // group_size, n) or zeros.shape != scales.shape:
        raise ValueError(f"packed {tuple(packed.shape)}, scales {tuple(scales.shape)}, zeros {tuple(zeros.shape)} "
                         f"do not match group {group_size}")
    paired = scales.dtype == torch.int32
    if paired and torch.finfo(dtype).bits != 16:
        raise ValueError(f"paired scales and zeros (int32 words) dequantize to a 16-bit dtype, not {dtype}")
    out = torch.empty((n, k), device=packed.device, dtype=dtype)
    grid = (int4_triton.triton.cdiv(n, BLOCK_N), k // bk)
    _jitted(os.environ.get("TRITON_INTERPRET") == "1")[grid](
        packed, scales.contiguous(), zeros.contiguous(), out, n, k, packed.stride(0), GROUP=group_size,
        BLOCK_N=BLOCK_N, BLOCK_K=bk, HALF=bk // 2, PAIRED=paired, num_warps=4)
    return out


def int4_dequant_mm(x2d: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                    group_size: int) -> torch.Tensor:
    """``y [M, N] = x2d [M, K] @ dequant(W)^T`` in ``x2d``'s dtype: :func:`dequantize`, then ``torch.matmul``."""
    if packed.shape[1] * 2 != x2d.shape[1]:
        raise ValueError(f"x {tuple(x2d.shape)} does not match packed {tuple(packed.shape)}")
    return x2d @ dequantize(packed, scales, zeros, group_size, x2d.dtype).t()
