"""A bf16 GEMV for decode steps of 1..8 rows (``model_server/data/gemv_bf16.cu``, NVRTC), for the fast engine.

At one row cuBLAS runs the 1B preset's down projection (2048 x 8192) as a split-K GEMM plus a reduce kernel at about
2.2 TB/s on an H100, and its small q/k/v and o projections at 1.3-2.0 TB/s (docs/benchmarks.md, "The greedy pick as two
kernels"); a decode step at one row is ~84 % GEMM time. This kernel reads each weight row once with 16-byte streaming
loads, one warp per ``rpw`` rows, fp32 sums (what cuBLAS accumulates in too), y rounded to bf16 once. With 2..8 rows of
x (``GemvConfig.rows``) each weight chunk is read once and used for every row, so such a step reads the weights once as
a one-row step does (experimental, not yet measured: the engine routes more than one row here only with
``MODEL_SERVER_FAST_GEMV_ROWS``).

Owns the configurations, the choice per shape and row count, the launch and :func:`emulate` (the kernel's arithmetic
in PyTorch); the compile and the cubin cache are :mod:`model_server.int4_mma_build`'s; :func:`install` routes a model's
bf16 ``nn.Linear`` modules through it for inputs of 1..``max_rows`` rows (the fast engine's default on CUDA, one row;
``MODEL_SERVER_FAST_GEMV=0`` keeps cuBLAS).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

SOURCE_PATH = Path(__file__).with_name("data") / "gemv_bf16.cu"
MAX_ROWS = 8              # rows of x one launch takes (the kernel's template argument R)


@dataclass(frozen=True)
class GemvConfig:
    rpw: int = 1          # rows per warp
    warps: int = 8        # warps per CTA
    unroll: int = 4       # 16-byte chunks per row and lane in flight
    rows: int = 1         # rows of x (1: the one-row kernel measured on 2026-12-06, its name unchanged)

    def name(self) -> str:
        tail = "" if self.rows == 1 else f", {self.rows}"
        return f"gemv_bf16<{self.rpw}, {self.warps}, {self.unroll}{tail}>"

    def grid(self, n: int) -> int:
        rows = self.rpw * self.warps
        return (n + rows - 1) // rows


# one row: the twelve measured on 2026-12-06; more rows: what choose() returns for each count, and for 2, 4 and 8 (the
# engine's batch buckets) the alternatives the benchmark compares. Registers grow with rpw x rows x unroll (x rows of
# 16 bytes per chunk in flight): 8 rows keep to two chunks in flight. All unrolls even: see emulate().
CONFIGS = (tuple(GemvConfig(r, w, u) for r in (1, 2) for w in (4, 8) for u in (2, 4, 8))
           + (GemvConfig(1, 8, 4, 2), GemvConfig(1, 8, 2, 2), GemvConfig(2, 8, 4, 2), GemvConfig(1, 8, 8, 2))
           + tuple(GemvConfig(1, 8, 2, r) for r in (3, 5, 6, 7))
           + (GemvConfig(1, 8, 2, 4), GemvConfig(1, 8, 4, 4), GemvConfig(2, 8, 2, 4), GemvConfig(2, 8, 4, 4))
           + (GemvConfig(1, 8, 2, 8), GemvConfig(1, 8, 4, 8), GemvConfig(2, 8, 2, 8), GemvConfig(4, 4, 2, 8)))


def choose(n: int, k: int, rows: int = 1) -> GemvConfig:
    """The configuration for ``rows`` rows of x and an ``[n, k]`` weight. One row: one row per warp, 8 warps, 4 chunks
    in flight, the fastest or within 0.03 us of it on each of the 1B preset's five shapes on an H100
    (``gemv_bf16_bench.py``, 2026-12-06, raw ``benchmarks/results/2026-12-06-h100/gemvcu_0446/``). More rows: a rule
    not yet measured (``gemv_bf16_bench.py --rows``): still one weight row per warp (as many warps as one row has, for
    the small shapes' sake), 4 chunks in flight at 2 rows, 2 above (the x chunks' registers)."""
    if not 1 <= rows <= MAX_ROWS:
        raise ValueError(f"the GEMV takes 1..{MAX_ROWS} rows, not {rows}")
    if rows == 1:
        return GemvConfig(1, 8, 4)
    return GemvConfig(1, 8, 4 if rows == 2 else 2, rows)


def usable(w: torch.Tensor) -> bool:
    """A CUDA bf16 weight ``[N, K]``, contiguous, 16-byte aligned, ``K % 8 == 0``, on a card with bf16 (sm_80+)."""
    return (w.is_cuda and w.dtype == torch.bfloat16 and w.dim() == 2 and w.is_contiguous() and w.shape[1] % 8 == 0
            and w.data_ptr() % 16 == 0 and torch.cuda.get_device_capability(w.device) >= (8, 0))


def gemv(x: torch.Tensor, w: torch.Tensor, cfg: GemvConfig | None = None) -> torch.Tensor:
    """``x @ w.T`` for 1..:data:`MAX_ROWS` rows: ``x`` bf16 ``[..., K]`` holding that many rows, ``w [N, K]``
    (:func:`usable`); returns bf16 of ``x``'s leading shape with ``N`` last. ``cfg`` (default :func:`choose`'s) must
    be for that many rows."""
    from model_server.int4_mma_build import device_index, kernel
    n, k = w.shape
    rows = x.numel() // k
    cfg = cfg or choose(n, k, rows)
    if x.shape[-1] != k or cfg.rows != rows:
        raise ValueError(f"{cfg.name()} takes {cfg.rows} rows of {k}, got x of shape {tuple(x.shape)}")
    x1 = x.reshape(rows, k)
    if not x1.is_contiguous() or x1.data_ptr() % 16:   # the kernel's 16-byte loads: a fresh, aligned copy
        x1 = x1.clone(memory_format=torch.contiguous_format)
    y = torch.empty(*x.shape[:-1], n, dtype=torch.bfloat16, device=w.device)
    fn = kernel(cfg.name(), device_index(w.device), SOURCE_PATH)
    fn(grid=(cfg.grid(n), 1, 1), block=(cfg.warps * 32, 1, 1), args=[x1, w, y, n, k], shared_mem=0)
    return y


def _forward(self: nn.Linear, x: torch.Tensor, max_rows: int = 1) -> torch.Tensor:
    if 0 < x.numel() <= max_rows * self.in_features and x.dtype == torch.bfloat16:
        return gemv(x, self.weight)
    return F.linear(x, self.weight, self.bias)


def eligible(model: nn.Module) -> list[nn.Linear]:
    """``model``'s bf16 ``nn.Linear`` modules without bias whose weight is :func:`usable`."""
    return [m for m in model.modules() if type(m) is nn.Linear and m.bias is None and usable(m.weight)]


def install(model: nn.Module, max_rows: int = 1) -> int:
    """Route every :func:`eligible` linear of ``model`` through :func:`gemv` for inputs of 1..``max_rows`` rows (other
    inputs: ``F.linear`` as before); returns how many. The weights are not touched."""
    if not 1 <= max_rows <= MAX_ROWS:
        raise ValueError(f"max_rows must be 1..{MAX_ROWS}, got {max_rows}")
    mods = eligible(model)
    for mod in mods:
        mod.forward = partial(_forward, mod, max_rows=max_rows)      # type: ignore[method-assign]
    return len(mods)


def check_cases(max_rows: int = 1) -> list[tuple[int, int, int]]:
    """:func:`check`'s ``(rows, n, k)``: three shapes at one row; where ``max_rows > 1`` two at each of 2, 4, 8 rows up
    to ``max_rows`` and at ``max_rows`` itself (each row count a kernel to compile)."""
    cases = [(1, 3072, 2048), (1, 2048, 8192), (1, 77, 136)]
    for rows in sorted({r for r in (2, 4, 8) if r <= max_rows} | ({max_rows} - {1})):
        cases += [(rows, 3072, 2048), (rows, 77, 136)]
    return cases


def check(device: torch.device, max_rows: int = 1) -> str | None:
    """The kernel against an fp32 reference on :func:`check_cases`: None when every error is within bf16 rounding,
    else why not (one line)."""
    try:
        gen = torch.Generator(device=device).manual_seed(0)
        for rows, n, k in check_cases(max_rows):
            w = torch.randn(n, k, generator=gen, device=device).to(torch.bfloat16) * 0.05
            x = torch.randn(rows, k, generator=gen, device=device).to(torch.bfloat16)
            ref = x.float() @ w.float().T
            err = float(((gemv(x, w).float() - ref).abs().max() / ref.abs().max()))
            if err > 1e-2:
                return f"differs from fp32 by {err:.3g} of the largest output at {rows} x {n}x{k}"
    except Exception as exc:  # noqa: BLE001 - any failure: the caller keeps F.linear
        return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"
    return None



def emulate(x: torch.Tensor, w: torch.Tensor, unroll: int = 4, rounded: bool = True) -> torch.Tensor:
    """What the kernel computes for ``x [R, K]`` and ``w [N, K]`` (bf16) with ``unroll`` chunks in flight, in PyTorch
    on any device: ``[R, N]`` bf16, meant to equal the kernel bit for bit. Lane ``l`` adds chunk ``c = l + 32 j``'s
    eight products in order into chain ``(j % unroll) & 1`` (a bf16 x bf16 product is exact in fp32, so each fmaf is
    one fp32 add); the two chains summed, then the warp's butterfly (xor 16, 8, 4, 2, 1); bf16 rounding (nearest even)
    once (``rounded=False``: the fp32 sums before it). Chunks past K add +0 products, which leave every sum as it was.
    The chains do not depend on rpw or rows, and for an even ``unroll`` not on it either: such configurations give a
    row of x the same bits."""
    n, k = w.shape
    steps = -(-(k // 8) // (32 * unroll)) * unroll        # chunk slots j per lane (whole iterations of the loop)
    pad = steps * 32 * 8 - k
    wf = F.pad(w.float(), (0, pad)).view(n, steps, 32, 8)
    xf = F.pad(x.reshape(-1, k).float(), (0, pad)).view(-1, steps, 32, 8)
    acc = torch.zeros(2, xf.shape[0], n, 32, device=w.device)
    for j in range(steps):
        chain = acc[(j % unroll) & 1]
        for e in range(8):
            chain += xf[:, None, j, :, e] * wf[None, :, j, :, e]
    s = acc[0] + acc[1]
    lanes = torch.arange(32, device=w.device)
    for o in (16, 8, 4, 2, 1):
        s = s + s[..., lanes ^ o]
    return s[..., 0].to(torch.bfloat16) if rounded else s[..., 0]
