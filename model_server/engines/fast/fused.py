"""Elementwise pieces of the decoder layer, optionally fused with ``torch.compile`` (CUDA only).

A decode step of a 1B model is ~700 tiny kernels when every RMSNorm, rotary and activation is run op by
op; inside a CUDA graph each still costs a few microseconds, which at batch 1 is more than reading the
weights. Fusing each piece into one kernel removes most of them. The functions compute exactly what
transformers' modules compute, in the same order and dtypes; with
``torch._inductor.config.emulate_precision_casts`` the fused kernels also round where eager rounds.

How they are compiled, ``MODEL_SERVER_FAST_COMPILE_SHAPES`` (:func:`shapes_mode`): ``rows`` (the default since
2026-12-07) compiles for static shapes but marks, at every call, the dimensions that vary with a step (rows, prompts,
tokens: :func:`row_dims`) dynamic (``torch._dynamo.maybe_mark_dynamic``), so one compile still serves every row count
while the model's sizes are constants in the kernels; ``dynamic`` (the default before) compiles each function once for
symbolic shapes, the hidden, intermediate and head sizes symbols too. On an H100 the rows compile was as fast as a
static one (the prefill's rotary 16.4 against 88-155 us per layer dynamic; ``benchmarks/compiled_ops_static.py``,
``rope_layout.py``); with the Triton add + RMSNorm it gave both formats 1-2 % more tokens/s at 64 streams, the same
spawn -> first token and a background compile 32-46 % shorter (docs/benchmarks.md, "GemLite loses at 64 rows, ..." and
"The rows compile and the Triton add + RMSNorm at a cold start").
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from model_server.switches import choice

from . import norm_kernel

log = logging.getLogger(__name__)

SHAPES_SWITCH = "MODEL_SERVER_FAST_COMPILE_SHAPES"
SHAPES_MODES = ("rows", "dynamic")          # the first is the default
BACKEND: object = "inductor"                # torch.compile's backend (tests count graphs with their own)


def shapes_mode() -> str:
    """``rows`` or ``dynamic`` from ``MODEL_SERVER_FAST_COMPILE_SHAPES`` (unset: ``rows``); another value raises
    :class:`model_server.switches.SwitchValueError`. Read when the ops are first compiled in a process."""
    return choice(SHAPES_SWITCH, SHAPES_MODES)


def row_dims(name: str, arg: int, t: torch.Tensor) -> tuple[int, ...]:
    """The dimensions of fused function ``name``'s tensor argument number ``arg`` that vary with a step: every one
    but the last (the model's size), except rope's head-major ``[n, heads, t, head_dim]`` (prompts and tokens only)
    and the split-K partials' count (``add_parts_rms_norm``'s first dimension: a loop bound, compiled per count)."""
    if t.dim() < 2:
        return ()
    if name == "rope" and t.dim() == 4:
        return (0, 2)
    first = 1 if name == "add_parts_rms_norm" and arg == 1 else 0
    return tuple(range(first, t.dim() - 1))


def mark_rows(name: str, args: tuple) -> None:
    """Mark the step-dependent dimensions of ``args`` dynamic (sizes 0 and 1 stay specialized, as dynamo does)."""
    for i, a in enumerate(args):
        if isinstance(a, torch.Tensor):
            for d in row_dims(name, i, a):
                if a.shape[d] > 1:
                    torch._dynamo.maybe_mark_dynamic(a, d)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * (x / sqrt(mean(x^2) + eps))`` computed in float32, cast back before the weight (as HF)."""
    dt = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dt)


def add_rms_norm(residual: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``h = residual + x`` and ``rms_norm(h)``: the residual add fused with the next norm."""
    h = residual + x
    return h, rms_norm(h, weight, eps)


def add_parts_rms_norm(residual: torch.Tensor, parts: torch.Tensor, weight: torch.Tensor, eps: float
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`add_rms_norm` of ``x = sum_s parts[s]``: split-K partial sums (fp32, ``[S, *residual.shape]``) added
    in split order and cast to the residual's dtype, as the INT4 GEMM's sum kernel does (the same bits)."""
    y = parts[0]
    for s in range(1, parts.shape[0]):
        y = y + parts[s]
    return add_rms_norm(residual, y.to(residual.dtype), weight, eps)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding of q and k: ``x * cos + rotate_half(x) * sin``."""
    return (q * cos) + (_rotate_half(q) * sin), (k * cos) + (_rotate_half(k) * sin)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` (Llama/Qwen2 MLP activation)."""
    return F.silu(gate) * up


class Ops:
    """The set of elementwise functions a runner uses: eager, or compiled once per process."""

    _compiled: dict[str, object] | None = None
    _compiled_mode: str | None = None

    def __init__(self, fuse: bool, device: torch.device | None = None, dtype: torch.dtype = torch.float32) -> None:
        self.fused = False
        self.error: str | None = None
        self.rms_norm, self.add_rms_norm, self.rope, self.silu_mul = rms_norm, add_rms_norm, rope, silu_mul
        self.add_parts_rms_norm = add_parts_rms_norm
        if fuse:
            try:
                fns = Ops._get_compiled()
                # compile now (lazily compiled functions fail at first call): a small trial of each
                x = torch.randn(2, 3, 64, device=device, dtype=dtype)
                w = torch.ones(64, device=device, dtype=dtype)
                torch.testing.assert_close(fns["rms_norm"](x, w, 1e-5), rms_norm(x, w, 1e-5))
                fns["add_rms_norm"](x, x, w, 1e-5)
                fns["rope"](x, x, x, x)
                fns["silu_mul"](x, x)
                self.rms_norm, self.add_rms_norm = fns["rms_norm"], fns["add_rms_norm"]
                self.rope, self.silu_mul = fns["rope"], fns["silu_mul"]
                self.add_parts_rms_norm = fns["add_parts_rms_norm"]    # compiled at first use (INT4 split K only)
                self.fused = True
            except Exception as exc:  # noqa: BLE001 - no compiler: stay eager
                self.error = f"{type(exc).__name__}: {exc}"
                log.warning("torch.compile unavailable, elementwise ops stay eager: %s", self.error)
        # the residual add + RMSNorm as one Triton kernel on CUDA (.norm_kernel; MODEL_SERVER_FAST_NORM)
        self.norm_kernel_error: str | None = None
        self.norm_kernel = norm_kernel.install(self, device, dtype)

    @classmethod
    def _get_compiled(cls) -> dict[str, object]:
        mode = shapes_mode()
        if cls._compiled is not None and cls._compiled_mode != mode:
            cls._compiled = None
        if cls._compiled is None:
            cls._compiled_mode = mode
            import torch._dynamo.config as dc
            import torch._inductor.config as ic

            if hasattr(ic, "emulate_precision_casts"):
                ic.emulate_precision_casts = True
            # each function sees a few shape families (decode/prefill, size-1 dims) per dtype
            for name in ("recompile_limit", "cache_size_limit"):
                if hasattr(dc, name):
                    setattr(dc, name, max(int(getattr(dc, name)), 64))
            opts = dict(dynamic=mode == "dynamic", fullgraph=True, backend=BACKEND)
            cls._compiled = {name: _Fallback(torch.compile(fn, **opts), fn, name, mark=mode == "rows")
                             for name, fn in (("rms_norm", rms_norm), ("add_rms_norm", add_rms_norm),
                                              ("rope", rope), ("silu_mul", silu_mul),
                                              ("add_parts_rms_norm", add_parts_rms_norm))}
        return cls._compiled


class _Fallback:
    """Call the compiled function; if compiling a new shape ever fails, use the eager one from then on."""

    def __init__(self, compiled, eager, name: str, mark: bool = False) -> None:
        self.compiled, self.eager, self.name, self.mark = compiled, eager, name, mark
        self.failed = False

    def __call__(self, *args):
        if not self.failed:
            try:
                if self.mark:
                    mark_rows(self.name, args)
                return self.compiled(*args)
            except Exception as exc:  # noqa: BLE001
                self.failed = True
                log.warning("compiled %s failed (%s: %s); using eager from now on", self.name,
                            type(exc).__name__, str(exc).splitlines()[0][:200])
        return self.eager(*args)
