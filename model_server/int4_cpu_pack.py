"""The CPU int4pack layout of merged projections: the packed weight of a row concatenation of CPU int4pack weights.

torch's CPU int4pack packing is its own (blocks of 64 output rows with AVX512, 32 with AVX2, and a partial last
block in another format), so row blocks concatenate only where every part is whole blocks; otherwise the parts
are unpacked and packed again. Used by :mod:`model_server.engines.fast.merged`.
"""
from __future__ import annotations

import functools

import torch

from model_server.int4 import INNER_K_TILES, _pack


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Every 4-bit slot of a packed weight, low then high nibble of each byte, in memory order (int64)."""
    b = packed.contiguous().view(torch.uint8).reshape(-1).to(torch.int64)
    return torch.stack([b & 15, b >> 4], dim=-1).reshape(-1)


def _cpu_int4pack_slots(n: int, k: int) -> torch.Tensor:
    """For the CPU int4pack weight of an ``[n, k]`` 4-bit matrix: the flat index (``row * k + col``) of the value in
    each of its nibble slots (:func:`_nibbles` order).

    That layout is the kernel's own and not one concatenation of rows: blocks of 64 output rows with AVX512, 32
    with AVX2, and a partial last block in another format, so it is measured here, never assumed. Packing places
    each value by its position alone, so packing the base-16 digits of every position's index, one digit at a
    time, spells out where each value goes."""
    index = torch.arange(n * k, dtype=torch.int64)
    slots = torch.zeros(n * k, dtype=torch.int64)
    for shift in range(0, max(n * k - 1, 1).bit_length(), 4):
        digit = ((index >> shift) & 15).to(torch.int32).view(n, k)
        slots |= _nibbles(torch.ops.aten._convert_weight_to_int4pack_for_cpu(digit, INNER_K_TILES)) << shift
    return slots


@functools.lru_cache(maxsize=64)
def _rows_concatenate(ns: tuple[int, ...], k: int) -> bool:
    """Whether CPU int4pack weights of ``[n, k]`` parts concatenate row-wise as they are: random values packed whole
    and in parts (once per shape in a process; every layer of a model shares a few)."""
    gen = torch.Generator().manual_seed(0)
    probe = [torch.randint(0, 16, (n, k), generator=gen, dtype=torch.int32) for n in ns]
    return torch.equal(_pack(torch.cat(probe), "cpu-int4pack"), torch.cat([_pack(q, "cpu-int4pack") for q in probe]))


def cat_cpu_int4pack(parts: list[tuple[torch.Tensor, int]], k: int) -> torch.Tensor:
    """The CPU int4pack weight of the row concatenation ``[sum n, k]`` of the ``(packed, n)`` CPU int4pack weights
    (``[n, k]`` each; merged projections). The packed rows concatenate as they are when every part is whole blocks
    of the kernel's rows (checked: random values packed both ways); otherwise the parts are unpacked
    (:func:`_cpu_int4pack_slots`), concatenated and packed again."""
    if _rows_concatenate(tuple(n for _, n in parts), k):
        return torch.cat([packed for packed, _ in parts])
    qs = []
    for packed, n in parts:
        q = torch.empty(n * k, dtype=torch.int64)
        q[_cpu_int4pack_slots(n, k)] = _nibbles(packed.cpu())
        qs.append(q.view(n, k))
    return _pack(torch.cat(qs), "cpu-int4pack").to(parts[0][0].device)
