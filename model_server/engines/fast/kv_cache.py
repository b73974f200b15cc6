"""Preallocated, fixed-slot KV cache and the bucket helpers that index it.

Layout: one K and one V tensor of shape ``[layers, slots, kv_heads, max_len, head_dim]``; slot ``s`` is
batch row ``s`` of every decode step, so a request keeps its rows from admission to finish and no
copy ever moves a sequence. Memory is ``2 * layers * slots * kv_heads * max_len * head_dim *
bytes_per_element`` bytes, allocated once.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch


def kv_cache_bytes(layers: int, slots: int, kv_heads: int, max_len: int, head_dim: int,
                   bytes_per_element: int) -> int:
    """Bytes of K plus V: ``2 * layers * slots * kv_heads * max_len * head_dim * bytes_per_element``."""
    return 2 * layers * slots * kv_heads * max_len * head_dim * bytes_per_element


def default_batch_buckets(max_batch: int) -> list[int]:
    """Powers of two up to ``max_batch``, plus ``max_batch`` itself (sorted, unique)."""
    out, b = [], 1
    while b < max_batch:
        out.append(b)
        b *= 2
    out.append(max_batch)
    return sorted(set(out))


def default_length_buckets(max_len: int, smallest: int = 128) -> list[int]:
    """Attention-length buckets: 1x and 1.5x each power of two from ``smallest``, capped at ``max_len``.

    A decode step attends over the smallest bucket that covers every active row's position, so the
    bytes read from the cache grow with the longest live sequence, not with ``max_len``. Two buckets
    per octave waste at most a third of the KV bytes read.
    """
    out, b = [], smallest
    while b < max_len:
        out.append(b)
        if b + b // 2 < max_len:
            out.append(b + b // 2)
        b *= 2
    out.append(max_len)
    return sorted(set(out))


def pick_bucket(buckets: list[int], need: int) -> int:
    """The smallest bucket ``>= need`` (``buckets`` sorted ascending; ``need`` must fit the largest)."""
    for b in buckets:
        if b >= need:
            return b
    raise ValueError(f"{need} exceeds the largest bucket {buckets[-1]}")


@dataclass
class StaticKVCache:
    """K/V tensors ``[layers, slots, kv_heads, max_len, head_dim]`` and a lowest-first slot allocator."""

    k: torch.Tensor
    v: torch.Tensor
    free: list[int]
    scratch: int = 0                 # number of extra, never-allocated slots after the real ones

    @classmethod
    def allocate(cls, layers: int, slots: int, kv_heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device, scratch: int = 0) -> "StaticKVCache":
        """``scratch`` extra slots (index ``slots`` ..) take the K/V writes of padding rows of bucketed
        prefill; they are never handed out and never read by a decode step (which reads ``[:b]``)."""
        shape = (layers, slots + scratch, kv_heads, max_len, head_dim)
        k = torch.zeros(shape, dtype=dtype, device=device)
        v = torch.zeros(shape, dtype=dtype, device=device)
        free = list(range(slots))
        heapq.heapify(free)
        return cls(k=k, v=v, free=free, scratch=scratch)

    @property
    def slots(self) -> int:
        return self.k.shape[1] - self.scratch

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    @property
    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2

    def take(self) -> int:
        """The lowest free slot (keeps live rows packed at the top, so decode buckets stay small)."""
        return heapq.heappop(self.free)

    def give_back(self, slot: int) -> None:
        heapq.heappush(self.free, slot)

    @property
    def n_free(self) -> int:
        return len(self.free)
