"""Rotary position embedding of the native model: inverse frequencies and the cos/sin tables.

Owns the three RoPE kinds the native build takes (``default``, ``linear``, ``llama3``; others go to
transformers, :func:`model_server.native.config.unsupported_reason`) and :class:`RotaryEmbedding`, whose
``forward(x, position_ids)`` is what the fast engine's runner calls once for every position. The arithmetic
is transformers' own, step for step (float32 frequencies computed on the CPU, ``cat(freqs, freqs)``,
cos/sin times the attention scaling, cast to ``x``'s dtype), so the tables are bit for bit the same.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


def _base_inv_freq(base: Any, dim: int, int_arange: bool) -> torch.Tensor:
    # the default kind builds the exponents as float directly; the scaled kinds as int64 then float (same values,
    # kept apart to follow each formula as written)
    if int_arange:
        exponents = torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float)
    else:
        exponents = torch.arange(0, dim, 2, dtype=torch.float)
    return 1.0 / (base ** (exponents / dim))


def inverse_frequencies(rope: dict[str, Any], head_dim: int) -> tuple[torch.Tensor, float]:
    """``(inv_freq float32 [head_dim / 2] on the CPU, attention scaling)`` for ``rope`` (standardised
    ``rope_parameters``). Raises ValueError for a kind it does not compute."""
    kind = rope["rope_type"]
    base = rope["rope_theta"]
    with torch.device("cpu"):
        return _inverse_frequencies(kind, base, rope, head_dim)


def _inverse_frequencies(kind: str, base: Any, rope: dict[str, Any], head_dim: int) -> tuple[torch.Tensor, float]:
    if kind == "default":
        return _base_inv_freq(base, head_dim, int_arange=False), 1.0
    dim = int(head_dim * rope.get("partial_rotary_factor", 1.0))
    inv_freq = _base_inv_freq(base, dim, int_arange=True)
    if kind == "linear":
        inv_freq /= rope["factor"]
        return inv_freq, 1.0
    if kind == "llama3":
        return _llama3(inv_freq, rope), 1.0
    raise ValueError(f"rope_type {kind!r} is not computed natively")


def _llama3(inv_freq: torch.Tensor, rope: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1's frequency scaling: long wavelengths divided by ``factor``, short ones kept, a smooth blend
    between ``original_max_position_embeddings / low_freq_factor`` and ``... / high_freq_factor``."""
    factor = rope["factor"]
    low, high = rope["low_freq_factor"], rope["high_freq_factor"]
    old_len = rope["original_max_position_embeddings"]
    low_wavelen = old_len / low
    high_wavelen = old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, blended, scaled)


class RotaryEmbedding(nn.Module):
    """``forward(x, position_ids) -> (cos, sin)`` in ``x``'s dtype, ``[..., positions, head_dim]``.

    ``inv_freq`` and ``original_inv_freq`` are non-persistent buffers (not in checkpoints), as in transformers.
    The constructor only shapes them (on the current default device: meta in the build; computing them there
    would run torch's reference kernels, which import ``torch._dynamo``); :meth:`reset_buffers` computes them."""

    def __init__(self, rope: dict[str, Any], head_dim: int, max_position_embeddings: int) -> None:
        super().__init__()
        self.rope = dict(rope)
        self.rope_type = rope["rope_type"]
        self.head_dim = head_dim
        self.max_seq_len_cached = self.original_max_seq_len = max_position_embeddings
        self.attention_scaling = 1.0            # the three kinds computed here never scale cos/sin
        dim = head_dim if self.rope_type == "default" else int(head_dim * rope.get("partial_rotary_factor", 1.0))
        n = len(range(0, dim, 2))
        self.register_buffer("inv_freq", torch.empty(n, dtype=torch.float32), persistent=False)
        self.register_buffer("original_inv_freq", torch.empty(n, dtype=torch.float32), persistent=False)

    def reset_buffers(self, device: torch.device | str) -> None:
        """Compute the frequencies on the CPU and place them on ``device`` (float32)."""
        inv_freq, self.attention_scaling = inverse_frequencies(self.rope, self.head_dim)
        self._buffers["inv_freq"] = inv_freq.to(device)
        self._buffers["original_inv_freq"] = inv_freq.clone().to(device)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)
