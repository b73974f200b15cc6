"""The GLU epilogue of the INT4 Triton GEMM (:mod:`model_server.int4_triton`): a merged gate/up projection that stores
``silu(gate) * up`` instead of both products, behind ``MODEL_SERVER_INT4_GLU_EPILOGUE``
(:func:`model_server.int4_triton_config.glu_on`).

With it (:func:`int4_triton_glu`, a merged gate/up projection ``[gate; up]`` of ``2 I`` rows): each program's
tile holds ``BLOCK_N / 2`` gate rows and the up rows ``I`` below them, and stores ``silu(gate) * up`` (``I`` columns)
instead of both products, rounding where the separate ops round (each product, then ``silu``, then the product), so
the MLP's SiLU-mul kernel and the write and read of the ``[M, 2 I]`` product go away. Without split K only (a merged
gate/up of a 1B model at 64 rows has 256 output tiles: no split on a card of at most 256 SMs). At 64 rows on an H100
the separate SiLU-mul took 47.0 us of a 1.32 ms INT4 decode step (docs/benchmarks.md, "INT4 at 64 streams, third
pass"); with the split sums in their consumers the two cuts took the 64-row graph step from 1.384 to 1.210 ms with
identical greedy tokens ("fourth pass"), so it is on by default (``MODEL_SERVER_INT4_GLU_EPILOGUE=0`` turns it off).
"""
from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch

from model_server import int4_triton
from model_server.int4_triton_config import Config, choose_config

tl: Any = None                       # Triton's language module, set by :func:`jitted_store`


def glu_store(acc, y_ptr, offs_m, m_mask, pid_n, N, stride_ym, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               SWAP_AB: tl.constexpr):
    """Store ``silu(gate) * up`` of a GLU tile (gate rows first, then up rows) to ``y [M, N]``, rounding as the
    separate ops do: both products to y's dtype, ``silu(g) = g * sigmoid(g)`` (fp32) to y's dtype, then the product
    (the fast engine's compiled ``silu_mul`` rounds there too: ``emulate_precision_casts``)."""
    if SWAP_AB:                                                            # acc [BLOCK_N, BLOCK_M]
        gate, up = tl.split(tl.permute(tl.reshape(acc, (2, BLOCK_N // 2, BLOCK_M)), (1, 2, 0)))
    else:                                                                  # acc [BLOCK_M, BLOCK_N]
        gate, up = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1)))
    dt = y_ptr.dtype.element_ty
    gate = gate.to(dt).to(tl.float32)
    act = (gate * tl.sigmoid(gate)).to(dt).to(tl.float32) * up.to(dt).to(tl.float32)
    offs_o = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
    if SWAP_AB:
        offs = offs_m[None, :] * stride_ym + offs_o[:, None]
        mask = m_mask[None, :] & (offs_o < N)[:, None]
    else:
        offs = offs_m[:, None] * stride_ym + offs_o[None, :]
        mask = m_mask[:, None] & (offs_o < N)[None, :]
    tl.store(y_ptr + offs, act.to(dt), mask=mask)


@lru_cache(maxsize=None)
def jitted_store(interpret: bool) -> Any:
    """:func:`glu_store` jitted (one per mode; ``int4_triton._jitted`` calls it after importing Triton)."""
    global tl
    tl = int4_triton.tl
    return int4_triton.triton.jit(glu_store)


def served_config(m: int, n: int, k: int, group_size: int, device: torch.device) -> Config | None:
    """The GEMM's configuration for an ``[M, K] x [N, K]`` launch where it can store the GLU (no split K, ``N`` even),
    else None."""
    cfg = choose_config(max(m, 1), n, k, int4_triton.block_k(group_size), int4_triton._num_sms(device))
    return None if cfg.split_k > 1 or n % 2 else cfg


def int4_triton_glu(x2d: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                    group_size: int, config: Config | None = None) -> torch.Tensor | None:
    """``silu(y[:, :I]) * y[:, I:]`` (``[M, I]``) for ``y = int4_triton_mm(...)`` of a merged ``[gate; up]`` weight of
    ``2 I`` rows, in one kernel (the GLU epilogue: module docstring), rounding where the GEMM followed by the separate
    ops rounds (``silu``'s exponential is Triton's, which may differ from another kernel's in the last fp32 bit).
    None where :func:`choose_config` (or ``config``) splits K
    for this launch, or the rows are odd: the caller runs the GEMM and the activation apart."""
    m, n, _ = int4_triton._checked(x2d, packed, scales, zeros, group_size)
    cfg = config or served_config(m, n, x2d.shape[1], group_size, x2d.device)
    if cfg is None or cfg.split_k > 1 or cfg.block_n % 2 or n % 2:
        return None
    y = torch.empty((m, n // 2), device=x2d.device, dtype=x2d.dtype)
    if m:
        x2d = x2d if x2d.stride(1) == 1 else x2d.contiguous()
        int4_triton._launch(x2d, packed, scales, zeros, group_size, cfg, y, y, False, True)
    return y
