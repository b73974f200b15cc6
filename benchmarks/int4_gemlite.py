"""GemLite's A16W4 Triton kernels on our INT4 weights, for benchmarks/gemlite_probe.py (issue 17: INT4 at 64 rows).

GemLite (a maintained library of low-bit Triton GEMM/GEMV kernels, Apache-2.0) takes HQQ's format, ``W ~ (W_q -
zeros) * scales`` per group of ``group`` input columns, scales and zeros ``[N, K / group]``; ours is ``W = (q - 8) *
scale + zero`` (``model_server/int4_quant.quantize_groupwise``, ``sz [K / group, N, 2]``). The same ``q`` with
``zeros = 8 - zero / scale`` is the same weight (:func:`hqq_meta`); GemLite's default packing folds it back into one
FMA per weight, ``W_q * scale + (-zeros * scale)`` = ``q * scale + (zero - 8 * scale)``, rounded once to the
activation dtype. GemLite imports only where CUDA is (its import queries the device); it travels to the GPU machine as
a wheel (``scripts/gpu_wheels.sh``).
"""
from __future__ import annotations

import importlib

import torch


def why_not() -> str | None:
    """None when GemLite imports here, else why not (one line)."""
    try:
        importlib.import_module("gemlite")
    except Exception as exc:  # noqa: BLE001 - ImportError, or its device query failing without CUDA
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]
    return None


def hqq_meta(sz: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> tuple[torch.Tensor, torch.Tensor]:
    """Our ``sz [K / group, N, 2]`` (scale, zero) as HQQ's ``(scales, zeros)``, each ``[N, K / group]`` in ``dtype``:
    ``(q - 8) * scale + zero == (q - zeros) * scale`` with ``zeros = 8 - zero / scale``."""
    scale = sz[..., 0].t().float()
    zero = sz[..., 1].t().float()
    return scale.to(dtype).contiguous(), (8 - zero / scale).to(dtype).contiguous()


def folded_weight(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group: int) -> torch.Tensor:
    """What GemLite's default (FMA) mode multiplies by, float32 ``[N, K]``: ``q * s + round(-zeros * s)``, the
    offset rounded to the scales' dtype as ``GemLiteLinearTriton.pack`` rounds it."""
    n, k = q.shape
    offset = (-zeros.float() * scales.float()).to(scales.dtype).float()
    w = q.reshape(n, k // group, group).float() * scales.float()[:, :, None] + offset[:, :, None]
    return w.reshape(n, k)


def layers(q: torch.Tensor, sz: torch.Tensor, group: int, count: int) -> list[tuple[object]]:
    """``count`` GemLite linears (bf16 in and out) holding the weight ``q [N, K]`` (uint8, 0..15 on the GPU) with our
    ``sz``, each a 1-tuple, for a benchmark's rotation over copies."""
    from gemlite import DType, GemLiteLinear

    n, k = q.shape
    scales, zeros = hqq_meta(sz)
    out: list[tuple[object]] = []
    for _ in range(count):
        lin = GemLiteLinear(4, group_size=group, in_features=k, out_features=n, input_dtype=DType.BF16,
                            output_dtype=DType.BF16)
        lin.pack(q, scales, zeros, None)
        out.append((lin,))
    return out
