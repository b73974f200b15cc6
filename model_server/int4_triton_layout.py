"""The weight layout of the INT4 Triton kernels (:mod:`model_server.int4_triton`'s GEMM, :mod:`model_server.int4_gemv`'s
small-rows kernel, :mod:`model_server.int4_dequant`'s prefill dequantization): packing 4-bit values and splitting the
scales and zeros. Owns the layout only; no kernel.

Layout (chosen so that a K-block's low nibbles and high nibbles are two contiguous halves of K, which needs no
interleaving in registers: one ``tl.dot`` per half):

* ``packed`` uint8 ``[N, K // 2]``, row-major (K contiguous: coalesced 16-byte loads per row). With
  ``BK = block_k(G)``, byte ``k0 // 2 + j`` (``k0`` a multiple of BK, ``0 <= j < BK / 2``) of row ``n`` holds
  ``q[n, k0 + j]`` in its low nibble and ``q[n, k0 + BK / 2 + j]`` in its high nibble.
* ``scales``, ``zeros``: ``[K // G, N]`` row-major (N contiguous), any float dtype (read as fp32); or, for the GEMM with
  16-bit activations, both in one int32 ``[K // G, N]`` (:func:`pair_scales_and_zeros`: the scale's bits in the low
  half, the zero's in the high half).
"""
from __future__ import annotations

import torch

__all__ = ["MAX_BLOCK_K", "block_k", "pack_int4", "pair_scales_and_zeros", "split_scales_and_zeros"]

MAX_BLOCK_K = 128


def block_k(group_size: int) -> int:
    """The K-block of the layout and kernel: ``min(group_size, 128)`` (divides the group; >= 32 for tl.dot)."""
    if group_size < 32 or group_size & (group_size - 1):
        raise ValueError(f"group size {group_size} must be a power of two >= 32")
    return min(group_size, MAX_BLOCK_K)


def pack_int4(q: torch.Tensor, group_size: int) -> torch.Tensor:
    """``q`` uint8 ``[N, K]`` in 0..15 -> uint8 ``[N, K // 2]`` in the kernel's layout (module docstring)."""
    n, k = q.shape
    bk = block_k(group_size)
    if k % group_size:
        raise ValueError(f"K={k} is not a multiple of the group size {group_size}")
    halves = q.to(torch.uint8).reshape(n, k // bk, 2, bk // 2)
    return (halves[:, :, 0] | (halves[:, :, 1] << 4)).reshape(n, k // 2).contiguous()


def split_scales_and_zeros(sz: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``scales_and_zeros [K/G, N, 2]`` (``int4.py``'s layout) -> ``(scales [K/G, N], zeros [K/G, N])``."""
    return sz[..., 0].contiguous(), sz[..., 1].contiguous()


def pair_scales_and_zeros(sz: torch.Tensor) -> torch.Tensor:
    """``scales_and_zeros [K/G, N, 2]`` in a 16-bit float dtype -> int32 ``[K/G, N]``, each word the column's (scale,
    zero) bits, scale in the low half (the kernel reads one 32-bit word per column and group and takes the halves as
    its activations' dtype: pair them in that dtype)."""
    if sz.dim() != 3 or sz.shape[-1] != 2 or sz.element_size() != 2 or not sz.is_floating_point():
        raise ValueError(f"pairing needs [K/G, N, 2] 16-bit scales and zeros, got {tuple(sz.shape)} {sz.dtype}")
    lo = sz[..., 0].contiguous().view(torch.int16).to(torch.int32) & 0xFFFF
    hi = sz[..., 1].contiguous().view(torch.int16).to(torch.int32)
    return (lo | (hi << 16)).contiguous()
