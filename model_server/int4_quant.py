"""Group-wise INT4 quantization of a weight matrix: the values every INT4 kernel of :mod:`model_server.int4` reads.

Per output row, per group of ``group_size`` input columns; asymmetric, 16 levels::

    scale = (max(w_g) - min(w_g)) / 15          zero = min(w_g) + 8 * scale
    q     = clamp(round((w - min(w_g)) / scale), 0, 15)            (integer, 4 bits)
    w'    = (q - 8) * scale + zero   (= min + q * scale)           (what every kernel computes)

so the largest error per weight is ``scale / 2``. (:func:`group_ranges` can instead search a clipped range per group
that minimizes the group's squared error; off: on a trained model it lowered the weights' error and yet
agreed with bf16 less often than min-max, docs/benchmarks.md.)

Owns the formula, the range search and their inverse; packing into a kernel's layout and choosing a kernel are
:mod:`model_server.int4`'s.
"""
from __future__ import annotations

import torch

CLIP_RATIOS = (1.0, 0.975, 0.95, 0.925, 0.9, 0.875, 0.85, 0.825, 0.8)   # group_ranges' candidates
SEARCH_CHUNK = 1 << 24       # weights quantized at once (bounds the range search's temporaries)


def group_ranges(g: torch.Tensor, search: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The range ``[lo, hi]`` each group of ``g`` (float32 ``[rows, groups, group_size]``) spreads its 16 levels over.

    Min-max, or with ``search`` the min-max range times the ratio from ``CLIP_RATIOS`` whose rounding error (sum of
    squares over the group, the clipped outliers' error included) is smallest: clipping a few outliers buys a finer
    step for the rest (as llama.cpp's and AWQ's quantizers search). 1.0 is a candidate, so it is never worse."""
    lo, hi = g.amin(dim=-1, keepdim=True), g.amax(dim=-1, keepdim=True)
    if not search:
        return lo, hi
    best = best_lo = best_hi = None
    for r in CLIP_RATIOS:
        lo_r, hi_r = lo * r, hi * r
        scale = ((hi_r - lo_r) / 15).clamp_min(1e-8)
        err = ((((g - lo_r) / scale).round_().clamp_(0, 15) * scale + lo_r - g) ** 2).sum(dim=-1, keepdim=True)
        if best is None:
            best, best_lo, best_hi = err, lo_r, hi_r
            continue
        take = err < best
        best = torch.where(take, err, best)
        best_lo, best_hi = torch.where(take, lo_r, best_lo), torch.where(take, hi_r, best_hi)
    return best_lo, best_hi


def quantize_groupwise(w: torch.Tensor, group_size: int,
                       clip_search: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``w [N, K]`` -> ``(q uint8 [N, K] in 0..15, scales_and_zeros float32 [K/group_size, N, 2])``, each group over
    :func:`group_ranges` (``clip_search``: the searched range, else min-max); rows in chunks of at most
    ``SEARCH_CHUNK`` weights, so the search's temporaries stay a few times that."""
    n, k = w.shape
    rows = max(1, SEARCH_CHUNK // k)
    qs, szs = [], []
    for i in range(0, n, rows):
        g = w[i:i + rows].detach().float().reshape(-1, k // group_size, group_size)
        lo, hi = group_ranges(g, clip_search)
        scale = ((hi - lo) / 15).clamp_min(1e-8)
        qs.append(((g - lo) / scale).round_().clamp_(0, 15).to(torch.uint8).reshape(-1, k))
        szs.append(torch.cat([scale, lo + 8 * scale], dim=-1))               # [rows, K/g, 2]: scale, zero
    return torch.cat(qs), torch.cat(szs).transpose(0, 1).contiguous()     # [K/g, N, 2]


def dequantize_groupwise(q: torch.Tensor, sz: torch.Tensor, group_size: int) -> torch.Tensor:
    """Inverse of :func:`quantize_groupwise` (float32 ``[N, K]``): ``(q - 8) * scale + zero``."""
    n, k = q.shape
    s = sz[..., 0].transpose(0, 1).float()[:, :, None]                      # [N, K/g, 1]
    z = sz[..., 1].transpose(0, 1).float()[:, :, None]
    return ((q.reshape(n, k // group_size, group_size).float() - 8) * s + z).reshape(n, k)
