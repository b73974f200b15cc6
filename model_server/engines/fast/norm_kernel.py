"""The residual add + RMSNorm of a decoder layer as one Triton kernel, optionally summing split-K partials first.

Every layer ends its attention and its MLP with ``h = h + o; x = rms_norm(h)`` (:func:`.fused.add_rms_norm`, 32 per
decode step of a 16-layer model), and where an INT4 projection hands over its split-K partial sums
(``MODEL_SERVER_INT4_SPLIT_SUM_IN_CONSUMER``) the same op sums them first (:func:`.fused.add_parts_rms_norm`). The
engine's fused ops are ``torch.compile``'d with dynamic shapes, where the hidden size is a symbol too: on an H100 the
64-row INT4 decode step spent 122.9 us in these 32 norms with the partials and 71.4 us without (docs/benchmarks.md,
"INT4 at 64 streams, fourth pass"), and the same dynamic compile made the prefill's rotary 5-9x slower than a static
one ("The prefill's compiled rotary"). Here one program per row holds the whole row in registers (the hidden size
rounded up to a power of two is the kernel's constant): the partials, the residual and the weight are read once, the
sum of squares is one in-register reduction, and ``h`` and the normed row are written once. One compile per model
(dtype, hidden size, number of partials) serves every row count; each is compiled at its first (eager) use, never
inside a graph capture (lazy graphs capture a shape after its eager run, eager ones after a warm-up of every shape),
and Triton's cache keeps it across starts.

Bits: ``h`` is exactly the eager op's (partials added in split order in fp32 and rounded to the model's dtype, as the
INT4 GEMM's sum kernel does; then the residual add, rounded); the normed row rounds where the eager op rounds (``h *
rsqrt(mean(h^2) + eps)`` to the model's dtype, then times the weight), but its sum of squares adds in Triton's order,
so a value can differ from the compiled or eager op's by one unit in the last place (tests/test_fast_norm_kernel.py).

``MODEL_SERVER_FAST_NORM`` (:func:`mode`): ``auto`` (the default since 2026-12-07: this kernel for ops built for a CUDA
device, where Triton imports; the fused op elsewhere), ``compiled`` (the fused op: the default before) or ``triton``
(this kernel where Triton runs: CUDA, or ``TRITON_INTERPRET=1`` for tests, whatever the ops' device). On an H100 it
took 104.5 against 121.7 us of the 64-row INT4 step's 32 norms; with the rows compile both formats gained 1-2 % tokens/s
at 64 streams and the background compile was 32-46 % shorter at the same spawn -> first token (docs/benchmarks.md,
"GemLite loses at 64 rows, ..." and "The rows compile and the Triton add + RMSNorm at a cold start"). Owns the kernel,
its launch, its first-use check (:func:`self_check`: on the ops' device, against the fused op; a kernel that fails it
is left out with one warning) and the switch; :func:`install` puts it into a :class:`.fused.Ops` (which calls it
whenever one is built).
"""
from __future__ import annotations

import logging
from typing import Any

import torch

from model_server.switches import choice

from . import rope_kv

log = logging.getLogger(__name__)

SWITCH = "MODEL_SERVER_FAST_NORM"
MODES = ("auto", "compiled", "triton")  # the first is the default

tl: Any = None                          # triton.language, bound at first use (CPU-only installs have no Triton)
_kernel: Any = None
_round: Any = None                      # rope_kv's jitted rounding helper, the kernel's global


def mode() -> str:
    """``auto``, ``compiled`` or ``triton`` from ``MODEL_SERVER_FAST_NORM`` (unset: ``auto``); another value raises
    :class:`model_server.switches.SwitchValueError`. Read when a runner builds its ops."""
    return choice(SWITCH, MODES)


def usable(device: torch.device | str | None = None) -> bool:
    """Whether ops built for ``device`` take this kernel: the switch says ``triton``, or ``auto`` and ``device`` is a
    CUDA device; and Triton runs here (a CUDA device or the interpreter). Imports Triton only when the switch and the
    device ask for the kernel."""
    m = mode()
    if m == "compiled" or (m == "auto" and (device is None or torch.device(device).type != "cuda")):
        return False
    return rope_kv.available(2)


def _add_norm_kernel(res_ptr, x_ptr, w_ptr, h_ptr, y_ptr, N, stride_r, stride_x, stride_split, stride_h, stride_y,
                     eps, SPLIT: tl.constexpr, BLOCK: tl.constexpr, BF16: tl.constexpr):
    """Program = one row: ``x`` = the row of ``x_ptr`` (``SPLIT`` = 0: in the model's dtype; else ``SPLIT`` fp32
    partials ``stride_split`` apart, added in order and rounded), ``h = round(res + x)``, ``y = round(round(h *
    rsqrt(mean(h^2) + eps)) * w)``; ``h`` and ``y`` stored in the model's dtype."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    out_ty: tl.constexpr = h_ptr.dtype.element_ty
    xp = x_ptr + row * stride_x + cols
    x = tl.load(xp, mask=mask, other=0.0).to(tl.float32)
    if SPLIT > 0:
        for i in tl.static_range(1, SPLIT):
            x += tl.load(xp + i * stride_split, mask=mask, other=0.0)
        x = _round(x, BF16, out_ty)
    r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    h = _round(r + x, BF16, out_ty)                   # 0 in the padding columns: no share of the sum of squares
    tl.store(h_ptr + row * stride_h + cols, h.to(out_ty), mask=mask)
    inv = tl.math.rsqrt(tl.sum(h * h, axis=0) / N + eps)
    y = _round(_round(h * inv, BF16, out_ty) * w, BF16, out_ty)
    tl.store(y_ptr + row * stride_y + cols, y.to(out_ty), mask=mask)


def _jitted() -> Any:
    """The kernel, ``triton.jit`` once at first use, with rope_kv's jitted rounding helper as its ``_round``."""
    global _kernel, _round, tl
    if _kernel is None:
        rope_kv._jitted()
        _round, tl = rope_kv._round, rope_kv.tl
        _kernel = rope_kv.triton.jit(_add_norm_kernel)
    return _kernel


def _warps(block: int) -> int:
    """8 columns per thread (one 16-byte bf16 load each), 1 to 16 warps."""
    return max(1, min(16, block // 256))


def _launch(residual: torch.Tensor, x2: torch.Tensor, split: int, weight: torch.Tensor, eps: float
            ) -> tuple[torch.Tensor, torch.Tensor]:
    n = residual.shape[-1]
    if weight.shape != (n,) or x2.shape[-1] != n or x2.stride(-1) != 1:
        raise ValueError(f"add_rms_norm kernel: residual {tuple(residual.shape)}, input {tuple(x2.shape)}, weight "
                         f"{tuple(weight.shape)} do not fit")
    r2 = residual.reshape(-1, n)
    h = torch.empty_like(r2)
    y = torch.empty_like(r2)
    rows = r2.shape[0]
    if rows:
        block = 1 << max(0, (n - 1).bit_length())
        stride_split = x2.stride(0) if split else 0
        stride_x = x2.stride(-2)
        _jitted()[(rows,)](r2, x2, weight.contiguous(), h, y, n, r2.stride(0), stride_x, stride_split, h.stride(0),
                           y.stride(0), float(eps), SPLIT=split, BLOCK=block, BF16=residual.dtype == torch.bfloat16,
                           num_warps=_warps(block))
    return h.view(residual.shape), y.view(residual.shape)


def add_rms_norm(residual: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`.fused.add_rms_norm` (``residual``, ``x`` and ``weight`` in the model's dtype): ``(h, rms_norm(h))``."""
    if x.shape != residual.shape:
        raise ValueError(f"add_rms_norm kernel: x {tuple(x.shape)} is not the residual's {tuple(residual.shape)}")
    return _launch(residual, x.reshape(-1, x.shape[-1]), 0, weight, eps)


def add_parts_rms_norm(residual: torch.Tensor, parts: torch.Tensor, weight: torch.Tensor, eps: float
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`.fused.add_parts_rms_norm`: ``parts`` fp32 ``[S, *residual.shape]``, summed in split order first."""
    if parts.dim() != residual.dim() + 1 or parts.shape[1:] != residual.shape or parts.dtype != torch.float32 \
            or parts.shape[0] < 1:
        raise ValueError(f"add_parts_rms_norm kernel: parts {tuple(parts.shape)} {parts.dtype} do not fit the "
                         f"residual {tuple(residual.shape)}")
    return _launch(residual, parts.reshape(parts.shape[0], -1, parts.shape[-1]), parts.shape[0], weight, eps)


def self_check(device: torch.device | str, dtype: torch.dtype) -> str | None:
    """None where the kernel runs on ``device`` and gives the eager op's ``h`` and, within two units in the last
    place (eight in fp32), its normed row on a small trial (2 x 3 rows of 64, ``dtype``); else why not, in one line."""
    from .fused import add_rms_norm as eager

    try:
        gen = torch.Generator().manual_seed(0)
        r, x = (torch.randn(2, 3, 64, generator=gen).to(device, dtype) for _ in range(2))
        w = torch.randn(64, generator=gen).to(device, dtype)
        (h, y), (h0, y0) = add_rms_norm(r, x, w, 1e-5), eager(r, x, w, 1e-5)
        ulps = 8 if dtype == torch.float32 else 2          # fp32: the device's rsqrt may differ by a few ulps
        tol = ulps * torch.finfo(dtype).eps * max(1.0, float(y0.abs().max()))
        off = float((y.float() - y0.float()).abs().max())
        if not torch.equal(h, h0) or off > tol:
            return f"differs from the fused op on a {dtype} trial (normed row off by up to {off:.3g})"
    except Exception as exc:  # noqa: BLE001 - reported, the fused op serves
        return f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
    return None


def install(ops: Any, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> bool:
    """Where :func:`usable` for ``device`` (the ops' device, of ``dtype``), point ``ops.add_rms_norm`` and
    ``ops.add_parts_rms_norm`` (a :class:`.fused.Ops`) at this kernel; True if it did. With a device, the kernel first
    passes :func:`self_check` there; one that fails is left out with one warning (``ops.norm_kernel_error`` says
    why) and the fused op serves."""
    if not usable(device):
        return False
    if device is not None:
        why = self_check(device, dtype)
        if why is not None:
            ops.norm_kernel_error = why
            log.warning("residual add + RMSNorm kernel off, the fused op serves: %s", why)
            return False
    ops.add_rms_norm, ops.add_parts_rms_norm = add_rms_norm, add_parts_rms_norm
    return True
