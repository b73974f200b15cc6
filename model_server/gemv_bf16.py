"""A bf16 GEMV for one-row decode steps (``model_server/data/gemv_bf16.cu``, NVRTC), as an opt-in for the fast engine.

At one row cuBLAS runs the 1B preset's down projection (2048 x 8192) as a split-K GEMM plus a reduce kernel at about
2.2 TB/s on an H100, and its small q/k/v and o projections at 1.3-2.0 TB/s (docs/benchmarks.md, "The greedy pick as two
kernels"); a decode step at one row is ~84 % GEMM time. This kernel reads each weight row once with 16-byte streaming
loads, one warp per ``rpw`` rows, fp32 sums (what cuBLAS accumulates in too), y rounded to bf16 once.

Owns the configurations, the choice per shape and the launch; the compile and the cubin cache are
:mod:`model_server.int4_mma_build`'s; :func:`install` routes a model's bf16 ``nn.Linear`` modules through it for
one-row inputs (the fast engine's default on CUDA; ``MODEL_SERVER_FAST_GEMV=0`` keeps cuBLAS).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

SOURCE_PATH = Path(__file__).with_name("data") / "gemv_bf16.cu"


@dataclass(frozen=True)
class GemvConfig:
    rpw: int = 1          # rows per warp
    warps: int = 8        # warps per CTA
    unroll: int = 4       # 16-byte chunks per row and lane in flight

    def name(self) -> str:
        return f"gemv_bf16<{self.rpw}, {self.warps}, {self.unroll}>"

    def grid(self, n: int) -> int:
        rows = self.rpw * self.warps
        return (n + rows - 1) // rows


CONFIGS = tuple(GemvConfig(r, w, u) for r in (1, 2) for w in (4, 8) for u in (2, 4, 8))


def choose(n: int, k: int) -> GemvConfig:
    """The configuration for an ``[n, k]`` weight: one row per warp, 8 warps, 4 chunks in flight, the fastest or within
    0.03 us of it on each of the 1B preset's five shapes on an H100 (``gemv_bf16_bench.py``, 2026-12-06, raw
    ``benchmarks/results/2026-12-06-h100/gemvcu_0446/``)."""
    return GemvConfig(1, 8, 4)


def usable(w: torch.Tensor) -> bool:
    """A CUDA bf16 weight ``[N, K]``, contiguous, 16-byte aligned, ``K % 8 == 0``, on a card with bf16 (sm_80+)."""
    return (w.is_cuda and w.dtype == torch.bfloat16 and w.dim() == 2 and w.is_contiguous() and w.shape[1] % 8 == 0
            and w.data_ptr() % 16 == 0 and torch.cuda.get_device_capability(w.device) >= (8, 0))


def gemv(x: torch.Tensor, w: torch.Tensor, cfg: GemvConfig | None = None) -> torch.Tensor:
    """``x @ w.T`` for one row: ``x`` with ``K`` elements (any leading shape of one row), ``w [N, K]``
    (:func:`usable`); returns bf16 of ``x``'s leading shape with ``N`` last."""
    from model_server.int4_mma_build import device_index, kernel
    n, k = w.shape
    x1 = x.reshape(k)
    if not x1.is_contiguous() or x1.data_ptr() % 16:   # the kernel's 16-byte loads: a fresh, aligned copy
        x1 = x1.clone(memory_format=torch.contiguous_format)
    cfg = cfg or choose(n, k)
    y = torch.empty(*x.shape[:-1], n, dtype=torch.bfloat16, device=w.device)
    fn = kernel(cfg.name(), device_index(w.device), SOURCE_PATH)
    fn(grid=(cfg.grid(n), 1, 1), block=(cfg.warps * 32, 1, 1), args=[x1, w, y, n, k], shared_mem=0)
    return y


def _forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if x.numel() == self.in_features and x.dtype == torch.bfloat16:
        return gemv(x, self.weight)
    return F.linear(x, self.weight, self.bias)


def eligible(model: nn.Module) -> list[nn.Linear]:
    """``model``'s bf16 ``nn.Linear`` modules without bias whose weight is :func:`usable`."""
    return [m for m in model.modules() if type(m) is nn.Linear and m.bias is None and usable(m.weight)]


def install(model: nn.Module) -> int:
    """Route every :func:`eligible` linear of ``model`` through :func:`gemv` for one-row inputs (other inputs:
    ``F.linear`` as before); returns how many. The weights are not touched."""
    mods = eligible(model)
    for mod in mods:
        mod.forward = _forward.__get__(mod)       # type: ignore[method-assign]
    return len(mods)


def check(device: torch.device) -> str | None:
    """The kernel against an fp32 reference on a few shapes: None when every error is within bf16 rounding, else why
    not (one line)."""
    try:
        gen = torch.Generator(device=device).manual_seed(0)
        for n, k in ((3072, 2048), (2048, 8192), (77, 136)):
            w = torch.randn(n, k, generator=gen, device=device).to(torch.bfloat16) * 0.05
            x = torch.randn(1, k, generator=gen, device=device).to(torch.bfloat16)
            ref = x.float() @ w.float().T
            err = float(((gemv(x, w).float() - ref).abs().max() / ref.abs().max()))
            if err > 1e-2:
                return f"differs from fp32 by {err:.3g} of the largest output at {n}x{k}"
    except Exception as exc:  # noqa: BLE001 - any failure: the caller keeps F.linear
        return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"
    return None

