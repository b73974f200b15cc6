"""A Triton fused W4A16 kernel for ``model_server/int4.py``'s INT4 linears when a step has more than a few rows.

PyTorch's int4pack kernel (tinygemm) falls far behind bf16 above 8 rows (docs/benchmarks.md, "INT4 kernels per
layer"); this kernel dequantizes in registers and runs the product on tensor cores, so batched decode and prefill
read 4-bit weights at GEMM speed. :class:`model_server.int4.Int4Linear` dispatches by rows
(:mod:`model_server.int4_choice`).

Owns: the kernel and its wrapper :func:`int4_triton_mm` (re-exporting the layout's :func:`pack_int4`,
:func:`split_scales_and_zeros`, :func:`block_k`); the launch configuration is :mod:`model_server.int4_triton_config`'s.
Must NOT: quantize weights (``int4_quant.quantize_groupwise`` does) or decide which kernel a layer uses (the caller
does, with :func:`available`).

Math (same quantization as ``int4.py``; ``q`` in 0..15, one (scale, zero) per output column ``n`` and group of
``G`` input columns; ``BLOCK_K`` divides ``G``, so scale and zero are constant over a K-block)::

    y[m, n] = sum_k x[m, k] * ((q[n, k] - 8) * scale[k // G, n] + zero[k // G, n])

``c + q`` is made exactly in the activation dtype without an int -> float conversion: the bits ``MAGIC | q`` are the
float ``c + q`` (bf16 ``0x4300 | q`` = 128 + q, fp16 ``0x6400 | q`` = 1024 + q). With ``zz = zero - (c + 8) * scale``
(fp32), two modes (``Config.fold``):

* dequant: ``w = (c + q) * scale + zz`` (fp32, rounded to the activation dtype), ``acc += x @ w^T`` (tensor cores);
* fold: ``acc += scale * (x @ (c + q)^T) + zz * rowsum(x)`` per K-block (``(c + q)`` is exact, so only fp32 rounding);
* dequant in the activation dtype (``Config.fma``, :func:`deq_mode`): ``w = fma((c + q) - (c + 8), scale, zero)``.

fp32 activations (tests, interpreter) convert ``q`` to float instead (``c = 0``). The weight layout is
:mod:`model_server.int4_triton_layout`'s (a K-block's low and high nibbles: two halves of K, one ``tl.dot`` each).

Split K (``Config.split_k`` > 1) writes fp32 partial sums to ``[split, M, N]``; up to 32 rows by default the program
that finishes last for an output tile sums them (a ticket per tile, :mod:`model_server.int4_triton_split`), above
that a second small kernel does (``MODEL_SERVER_INT4_TRITON_SPLIT_REDUCE`` = ``ticket`` / ``kernel`` for every M).
Both add the partials in split order from zero, so they give the same bits.

The GLU epilogue (``GLU``: a merged gate/up storing ``silu(gate) * up``) is :mod:`model_server.int4_triton_glu`'s.

Runs on CUDA (bf16 / fp16 activations) and, for tests, on CPU in Triton's interpreter (``TRITON_INTERPRET=1``,
fp32 / fp16 only: the interpreter cannot bit-cast to bf16; read when the kernel is first used).
"""
from __future__ import annotations

import os
import types
from functools import lru_cache
from typing import Any

import torch

from model_server import int4_triton_split
from model_server.int4_triton_layout import (MAX_BLOCK_K, block_k, pack_int4, pair_scales_and_zeros,
                                            split_scales_and_zeros)
from model_server.int4_triton_config import Config, choose_config, deq, fence_on, pdl_on

__all__ = ["MAX_BLOCK_K", "available", "block_k", "int4_triton_mm", "pack_int4", "pair_scales_and_zeros",
           "split_scales_and_zeros"]

triton: Any = None                   # imported at first use (:func:`_import_triton`): CPU-only installs have none,
tl: Any = None                       # and the interpreter must be chosen before Triton's own import
gdc_wait: Any = None                 # programmatic dependent launch (sm_90+): wait for the previous kernel's writes,
gdc_launch_dependents: Any = None    # and let the next kernel launch (:func:`model_server.int4_triton_config.pdl`)
_glu_store: Any = None               # the GLU epilogue's store: set in each mode's copy of the GEMM (:func:`_jitted`)


def _import_triton() -> bool:
    global triton, tl, gdc_wait, gdc_launch_dependents
    if triton is None:
        try:
            import triton as triton_mod
            import triton.language as tl_mod
            from triton.language.extra.cuda import gdc_launch_dependents as launch_fn, gdc_wait as wait_fn
        except ImportError:
            return False
        triton, tl, gdc_wait, gdc_launch_dependents = triton_mod, tl_mod, wait_fn, launch_fn
    return True


def available() -> bool:
    """Triton importable and (CUDA present or the interpreter requested with ``TRITON_INTERPRET=1``).
    Imports Triton: set TRITON_INTERPRET before the first call."""
    if not _import_triton():
        return False
    return os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()


@lru_cache(maxsize=None)
def _capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device) if device.type == "cuda" else (0, 0)


@lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 8                         # interpreter on CPU: small grids


def _w4a16_kernel(x_ptr, w_ptr, s_ptr, z_ptr, y_ptr, M, N, stride_xm, stride_wn, stride_ym, stride_ys, out_ptr,
                  cnt_ptr, ITERS_PER_SPLIT: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HALF: tl.constexpr, MAGIC: tl.constexpr,
                  C8: tl.constexpr, SWAP_AB: tl.constexpr, FOLD: tl.constexpr, SPLIT: tl.constexpr,
                  TICKET: tl.constexpr, DEQ: tl.constexpr, PDL: tl.constexpr, FENCE: tl.constexpr,
                  GLU: tl.constexpr, PAIRED: tl.constexpr):
    """One program: a [BLOCK_N, BLOCK_M] tile of y^T (SWAP_AB) or [BLOCK_M, BLOCK_N] of y, over ITERS_PER_SPLIT
    K-blocks of split ``program_id(2)``, stored to ``y_ptr`` (split ``pid_k``'s slice). HALF = BLOCK_K // 2; MAGIC,
    C8 = c + 8: module docstring. DEQ (:func:`model_server.int4_triton_config.deq`): 0 dequantize in fp32 (or fold),
    1 one FMA per weight in the activation dtype, 2 the same with ``c + q`` made by inline PTX. PDL / FENCE:
    :func:`~model_server.int4_triton_config.pdl_on` / :func:`~model_server.int4_triton_config.fence_on`. TICKET
    (SPLIT > 1; SPLIT is 1 without it): the tile's last program (ticket SPLIT - 1 from the tile's counter in
    ``cnt_ptr``) sums the SPLIT partials of ``y_ptr`` into ``out_ptr`` and resets the counter to 0. GLU (no split):
    ``N`` is the output's width ``I``, the weight has ``2 I`` rows, and the tile's rows are ``BLOCK_N / 2`` gate rows
    then the up rows ``I`` below them; ``silu(gate) * up`` is stored (module docstring). PAIRED
    (16-bit activations): ``s_ptr`` holds each (scale, zero) as one 32-bit word, scale in the low half
    (:func:`~model_server.int4_triton_config.paired_scales_on`); ``z_ptr`` is not read.
    Ordering on a GPU: each thread's partial stores, a CTA barrier, then one thread's acq_rel atomic at GPU scope
    (release: cumulative over the barrier); the last program's acquire, the barrier Triton puts after a scalar
    atomic (and ours), then loads that bypass L1 (.cg): the pattern of CUTLASS's GenericBarrier."""
    if PDL:                                                                # launched early: wait for the producer
        gdc_wait()
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    if GLU:                                                                # gate rows, then the up rows I below
        offs_o = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N) % (BLOCK_N // 2)
        offs_n = offs_o + (tl.arange(0, BLOCK_N) // (BLOCK_N // 2)) * N
        n_mask = offs_o < N
    else:
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
    NS = N * (1 + GLU)                                                     # the scales' and zeros' row length
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_h = tl.arange(0, HALF)
    m_mask = offs_m < M
    if SWAP_AB:
        w_ptrs = w_ptr + offs_n[:, None] * stride_wn + offs_h[None, :]     # [BLOCK_N, HALF] packed bytes
        x_ptrs = x_ptr + offs_m[None, :] * stride_xm + offs_h[:, None]     # [HALF, BLOCK_M] = x^T
        w_mask = n_mask[:, None]
        x_mask = m_mask[None, :]
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        w_ptrs = w_ptr + offs_n[None, :] * stride_wn + offs_h[:, None]     # [HALF, BLOCK_N]
        x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_h[None, :]     # [BLOCK_M, HALF]
        w_mask = n_mask[None, :]
        x_mask = m_mask[:, None]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for it in range(0, ITERS_PER_SPLIT):
        k0 = (pid_k * ITERS_PER_SPLIT + it) * BLOCK_K
        b = tl.load(w_ptrs + k0 // 2, mask=w_mask, other=0)
        x_lo = tl.load(x_ptrs + k0, mask=x_mask, other=0.0)
        x_hi = tl.load(x_ptrs + (k0 + HALF), mask=x_mask, other=0.0)
        if MAGIC == 0:                                                     # fp32: c = 0
            w_lo = (b & 15).to(tl.float32)
            w_hi = (b >> 4).to(tl.float32)
        elif DEQ == 2 and MAGIC == 0x4300:                                 # c + q by PTX: 4 instructions per 2 bytes
            w_lo, w_hi = tl.inline_asm_elementwise(
                "{ .reg .b32 t; prmt.b32 t, $2, 0, 0x4140; lop3.b32 $0, t, 0x000f000f, 0x43004300, 0xea; "
                "shr.u32 t, t, 4; lop3.b32 $1, t, 0x000f000f, 0x43004300, 0xea; }",
                "=r,=r,r", [b], dtype=(x_lo.dtype, x_lo.dtype), is_pure=True, pack=2)
        elif DEQ == 2:                                                     # fp16: magic 1024
            w_lo, w_hi = tl.inline_asm_elementwise(
                "{ .reg .b32 t; prmt.b32 t, $2, 0, 0x4140; lop3.b32 $0, t, 0x000f000f, 0x64006400, 0xea; "
                "shr.u32 t, t, 4; lop3.b32 $1, t, 0x000f000f, 0x64006400, 0xea; }",
                "=r,=r,r", [b], dtype=(x_lo.dtype, x_lo.dtype), is_pure=True, pack=2)
        else:                                                              # c + q, exact, no conversion
            w_lo = ((b & 15).to(tl.int16) | MAGIC).to(tl.int16).to(x_lo.dtype, bitcast=True)
            w_hi = ((b >> 4).to(tl.int16) | MAGIC).to(tl.int16).to(x_lo.dtype, bitcast=True)
        g = k0 // GROUP
        if PAIRED:                                                         # (scale, zero) as one 32-bit word
            sz = tl.load(s_ptr + g * NS + offs_n, mask=n_mask, other=0)
            s_raw = (sz & 0xFFFF).to(tl.int16).to(x_lo.dtype, bitcast=True)
            z_raw = (sz >> 16).to(tl.int16).to(x_lo.dtype, bitcast=True)
        else:
            s_raw = tl.load(s_ptr + g * NS + offs_n, mask=n_mask, other=0.0)
            z_raw = tl.load(z_ptr + g * NS + offs_n, mask=n_mask, other=0.0)
        if FENCE:                                                          # copies -> wgmma's async proxy (sm_90)
            tl.inline_asm_elementwise("fence.proxy.async.shared::cta; // $0", "=r", [], dtype=tl.int32,
                                      is_pure=False, pack=1)
        if DEQ >= 1:                                                       # (c + q) - (c + 8), exact; one rounding
            s16 = s_raw.to(x_lo.dtype)
            z16 = z_raw.to(x_lo.dtype)
            if SWAP_AB:
                acc = tl.dot(tl.fma(w_lo - C8, s16[:, None], z16[:, None]), x_lo, acc=acc)
                acc = tl.dot(tl.fma(w_hi - C8, s16[:, None], z16[:, None]), x_hi, acc=acc)
            else:
                acc = tl.dot(x_lo, tl.fma(w_lo - C8, s16[None, :], z16[None, :]), acc=acc)
                acc = tl.dot(x_hi, tl.fma(w_hi - C8, s16[None, :], z16[None, :]), acc=acc)
        else:
            s = s_raw.to(tl.float32)
            zz = z_raw.to(tl.float32) - C8 * s
            if SWAP_AB:
                if FOLD:
                    part = tl.dot(w_lo, x_lo)
                    part = tl.dot(w_hi, x_hi, acc=part)
                    xsum = tl.sum(x_lo.to(tl.float32), axis=0) + tl.sum(x_hi.to(tl.float32), axis=0)
                    acc += part * s[:, None] + zz[:, None] * xsum[None, :]
                else:
                    acc = tl.dot((w_lo.to(tl.float32) * s[:, None] + zz[:, None]).to(x_lo.dtype), x_lo, acc=acc)
                    acc = tl.dot((w_hi.to(tl.float32) * s[:, None] + zz[:, None]).to(x_lo.dtype), x_hi, acc=acc)
            else:
                if FOLD:
                    part = tl.dot(x_lo, w_lo)
                    part = tl.dot(x_hi, w_hi, acc=part)
                    xsum = tl.sum(x_lo.to(tl.float32), axis=1) + tl.sum(x_hi.to(tl.float32), axis=1)
                    acc += part * s[None, :] + xsum[:, None] * zz[None, :]
                else:
                    acc = tl.dot(x_lo, (w_lo.to(tl.float32) * s[None, :] + zz[None, :]).to(x_lo.dtype), acc=acc)
                    acc = tl.dot(x_hi, (w_hi.to(tl.float32) * s[None, :] + zz[None, :]).to(x_lo.dtype), acc=acc)
    if PDL:
        gdc_launch_dependents()                                            # the next kernel may start its launch
    if GLU:
        _glu_store(acc, y_ptr, offs_m, m_mask, pid_n, N, stride_ym, BLOCK_M, BLOCK_N, SWAP_AB)
        return
    if SWAP_AB:
        offs = offs_m[None, :] * stride_ym + offs_n[:, None]
        mask = m_mask[None, :] & n_mask[:, None]
    else:
        offs = offs_m[:, None] * stride_ym + offs_n[None, :]
        mask = m_mask[:, None] & n_mask[None, :]
    tl.store(y_ptr + pid_k * stride_ys + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)
    if TICKET:
        tl.debug_barrier()                                                 # every thread's partial stored
        cnt_ptr += pid_m * tl.num_programs(0) + pid_n
        if tl.atomic_add(cnt_ptr, 1, sem="acq_rel", scope="gpu") == SPLIT - 1:
            tl.debug_barrier()                                             # after the acquire, for every thread
            total = tl.zeros_like(acc)
            for i in tl.static_range(SPLIT):                               # split order: the sum kernel's bits
                total += tl.load(y_ptr + i * stride_ys + offs, mask=mask, other=0.0, cache_modifier=".cg")
            tl.store(out_ptr + offs, total.to(out_ptr.dtype.element_ty), mask=mask)
            tl.store(cnt_ptr, 0)                                           # zero again for the next launch


def _split_sum_kernel(p_ptr, y_ptr, MN, SPLIT: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """``y = sum_s p[s]`` over the split-K partials (fp32), cast to y's dtype."""
    if PDL:
        gdc_wait()
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for i in range(0, SPLIT):
        acc += tl.load(p_ptr + i * MN + offs, mask=mask, other=0.0)
    tl.store(y_ptr + offs, acc.to(y_ptr.dtype.element_ty), mask=mask)


@lru_cache(maxsize=None)
def _jitted(interpret: bool) -> tuple[Any, Any]:
    """``triton.jit`` at first use (TRITON_INTERPRET is read then), one pair per mode. The GEMM is not specialized
    on the row count ``M`` (Triton would otherwise compile M % 16 == 0 apart from the rest), so one compile per
    config serves every row count: the kernel pre-warm's padded 16-row prefill also compiles what a 4- or 8-row
    decode step runs, and a first batch of a new size does not stop for a compile. The GLU epilogue's store
    (:func:`model_server.int4_triton_glu.glu_store`), jitted for the same mode, is the one the GEMM of that mode
    calls: each mode's GEMM is a copy of :func:`_w4a16_kernel` with globals of its own (tests run both modes in one
    process; a module global rebound per mode handed the interpreter's GEMM a compiled store)."""
    from model_server import int4_triton_glu
    scope = dict(globals(), _glu_store=int4_triton_glu.jitted_store(interpret))
    kernel = types.FunctionType(_w4a16_kernel.__code__, scope, _w4a16_kernel.__name__)
    kernel.__qualname__, kernel.__doc__ = _w4a16_kernel.__qualname__, _w4a16_kernel.__doc__
    kernel.__annotations__ = _w4a16_kernel.__annotations__
    return triton.jit(kernel, do_not_specialize=["M"]), triton.jit(_split_sum_kernel)


_MAGIC = {torch.bfloat16: (0x4300, 136.0), torch.float16: (0x6400, 1032.0), torch.float32: (0, 8.0)}


def _checked(x2d: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
             group_size: int) -> tuple[int, int, int]:
    """``(M, N, K-blocks)`` of a launch; ValueError where the operands do not match (RuntimeError without Triton)."""
    if not _import_triton():
        raise RuntimeError("Triton is not installed")
    (m, k), n = x2d.shape, packed.shape[0]
    bk = block_k(group_size)
    if packed.shape[1] * 2 != k or k % group_size or scales.shape != (k // group_size, n) \
            or zeros.shape != scales.shape or x2d.dtype not in _MAGIC:
        raise ValueError(f"x {tuple(x2d.shape)} {x2d.dtype}, packed {tuple(packed.shape)}, scales "
                         f"{tuple(scales.shape)}, zeros {tuple(zeros.shape)} do not match group {group_size}")
    if scales.dtype == torch.int32 and x2d.element_size() != 2:
        raise ValueError(f"paired scales and zeros (int32 words) need 16-bit activations, got {x2d.dtype}")
    return m, n, k // bk


def _launch(x2d: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
            cfg: Config, part: torch.Tensor, y: torch.Tensor, ticket: bool, glu: bool) -> bool:
    """Launch the GEMM with ``cfg`` into ``part`` (``y``, or the split-K partials); returns whether PDL was used."""
    (m, k), bk = x2d.shape, block_k(group_size)
    n = y.shape[1]                                          # with ``glu``, the output's width: half the weight rows
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    sm90 = not interpret and _capability(x2d.device) >= (9, 0)
    magic, c8 = _MAGIC[x2d.dtype]
    grid = (triton.cdiv(packed.shape[0], cfg.block_n), triton.cdiv(m, cfg.block_m), cfg.split_k)
    cnt = int4_triton_split.counters(x2d.device, grid[0] * grid[1]) if ticket else y
    pdl = sm90 and pdl_on()
    mm_kernel = _jitted(interpret)[0]
    mm_kernel[grid](x2d, packed, scales.contiguous(), zeros.contiguous(), part, m, n, x2d.stride(0),
                    packed.stride(0), n, m * n, y, cnt, k // bk // cfg.split_k, GROUP=group_size, BLOCK_M=cfg.block_m,
                    BLOCK_N=cfg.block_n, BLOCK_K=bk, HALF=bk // 2, MAGIC=magic, C8=c8, SWAP_AB=cfg.swap_ab,
                    FOLD=cfg.fold, SPLIT=cfg.split_k if ticket else 1, TICKET=ticket, DEQ=deq(cfg, magic, interpret),
                    PDL=pdl, FENCE=sm90 and fence_on(), GLU=glu, PAIRED=scales.dtype == torch.int32,
                    num_warps=cfg.num_warps, num_stages=cfg.num_stages, **({"launch_pdl": True} if pdl else {}))
    return pdl


def int4_triton_mm(x2d: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                   group_size: int, config: Config | None = None, split_reduce: str | None = None,
                   partials: bool = False) -> torch.Tensor:
    """``y [M, N] = x2d [M, K] @ dequant(W)[N, K]^T`` in ``x2d``'s dtype (bf16, fp16 or fp32; fp32 accumulation).

    ``packed``/``scales``/``zeros`` as made by :func:`pack_int4` / :func:`split_scales_and_zeros` (or ``scales`` as
    :func:`~model_server.int4_triton_layout.pair_scales_and_zeros`'s int32 words: ``x2d`` in their dtype); ``config``
    overrides :func:`choose_config` (benchmark sweeps), ``split_reduce`` (``auto`` | ``ticket`` | ``kernel``) the switch
    :func:`model_server.int4_triton_split.mode` (A/B benchmarks). ``partials``: where the sum kernel would run, return
    the fp32 partial sums ``[split, M, N]`` instead (their sum in split order, cast, is ``y``'s bits)."""
    m, n, iters = _checked(x2d, packed, scales, zeros, group_size)
    if m == 0:
        return x2d.new_empty((0, n))
    x2d = x2d if x2d.stride(1) == 1 else x2d.contiguous()
    cfg = config or choose_config(m, n, x2d.shape[1], block_k(group_size), _num_sms(x2d.device))
    if iters % cfg.split_k:
        raise ValueError(f"split_k {cfg.split_k} does not divide the {iters} K-blocks")
    ticket = cfg.split_k > 1 and int4_triton_split.reduction(m, split_reduce) == "ticket"
    y = torch.empty((m, n), device=x2d.device, dtype=x2d.dtype)
    part = y if cfg.split_k == 1 else torch.empty((cfg.split_k, m, n), device=x2d.device, dtype=torch.float32)
    pdl = _launch(x2d, packed, scales, zeros, group_size, cfg, part, y, ticket, False)
    if cfg.split_k > 1 and not ticket:
        if partials:
            return part
        sum_kernel = _jitted(os.environ.get("TRITON_INTERPRET") == "1")[1]
        sum_kernel[(triton.cdiv(m * n, 1024),)](part, y, m * n, SPLIT=cfg.split_k, BLOCK=1024, PDL=pdl, num_warps=4,
                                                **({"launch_pdl": True} if pdl else {}))
    return y
