"""Merged projections: the linears that read the same input (q/k/v; gate/up) run as one GEMM.

A decode step of a 1B model at batch 1 is bound by kernel count and per-kernel latency, not bytes
(docs/benchmarks.md, "Steady state"): per layer, q, k and v are three GEMMs over the same input and
gate and up two more. Merging them removes 3 kernels per layer (48 for a 16-layer model) and gives each
remaining GEMM a wider output, which the GEMM kernels also use better at batch 64.

Merging is exact: each output column is the same dot product over the same input whatever the other
columns are. It keeps memory flat: the merged weight is allocated once and each original linear's
weight (or, for INT4, its packed weight) becomes a view of its rows, so the model's own modules still
compute what they computed (``model(ids)`` is unchanged) and nothing is held twice.

Kinds merged: ``nn.Linear`` (any float dtype) and :class:`model_server.int4.Int4Linear` (int4pack
layouts are blocks of output rows, so row blocks concatenate, and so do Triton's; on CPU, parts that are not
whole blocks of the kernel's rows are packed again; checked once on random inputs, and left separate if the
merged kernels disagree). Anything else (bitsandbytes NF4 ``Linear4bit``,
mixed kinds) stays separate: :func:`merge` returns None and the runner calls the parts.

Owns building the merged modules and splitting their output (or asking a merged gate/up's kernel for the
activation itself); the runner decides where to call them.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from model_server.int4 import Int4Linear, mma_int4pack_rows, mma_max_rows
from model_server.int4_cpu_pack import cat_cpu_int4pack
from .direct import hooked, run

log = logging.getLogger(__name__)


class Merged(nn.Module):
    """``y = x @ [W_1; ...; W_n]^T (+ b)``; ``split(y)`` returns the parts' outputs (views)."""

    def __init__(self, fn: nn.Module, sizes: list[int]) -> None:
        super().__init__()
        self.fn = fn
        self.sizes = list(sizes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return run(self.fn, x).split(self.sizes, dim=-1)

    def silu_mul(self, x: torch.Tensor) -> torch.Tensor | None:
        """For a merged gate/up: ``silu(gate) * up`` from the GEMM itself where its kernel can
        (``Int4Linear.forward_silu_mul``), else None (the caller splits :meth:`forward`'s output)."""
        fn = getattr(self.fn, "forward_silu_mul", None)
        if fn is None or len(self.sizes) != 2 or self.sizes[0] != self.sizes[1] or hooked(self.fn):
            return None
        return fn(x)


def _merge_linear(parts: list[nn.Linear]) -> nn.Module | None:
    w0 = parts[0].weight
    if any(p.weight.dtype != w0.dtype or p.weight.device != w0.device or p.in_features != parts[0].in_features
           for p in parts):
        return None
    if len({p.bias is None for p in parts}) != 1:
        return None
    out = nn.Linear(parts[0].in_features, sum(p.out_features for p in parts), bias=parts[0].bias is not None,
                    device="meta")
    with torch.no_grad():
        weight = torch.cat([p.weight.detach() for p in parts], dim=0)
        bias = torch.cat([p.bias.detach() for p in parts], dim=0) if parts[0].bias is not None else None
    out.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        out.bias = nn.Parameter(bias, requires_grad=False)
    row = 0
    for p in parts:       # the parts become views of the merged rows: memory is not doubled
        n = p.out_features
        p.weight = nn.Parameter(weight[row:row + n], requires_grad=False)
        if bias is not None:
            p.bias = nn.Parameter(bias[row:row + n], requires_grad=False)
        row += n
    return out


def _merge_int4(parts: list[Int4Linear]) -> nn.Module | None:
    p0 = parts[0]
    if any(p.kernel != p0.kernel or p.rows_kernel != p0.rows_kernel or p.group_size != p0.group_size
           or p.in_features != p0.in_features or p.compute_dtype != p0.compute_dtype for p in parts):
        return None
    if len({p.bias is None for p in parts}) != 1:
        return None
    perm = p0.input_perm          # GPTQ act order: parts that read one input share its order (same Hessian)
    if any((p.input_perm is None) != (perm is None) or (perm is not None and not torch.equal(p.input_perm, perm))
           for p in parts):
        return None
    # int4pack layouts: dim 0 of the packed weight is whole blocks of output rows (N/8 on CUDA, every N
    # is a multiple of 8 (int4.fits); N for plain nibbles); dim 1 of scales_and_zeros [K/g, N, 2] is the
    # output row. On CPU the kernel packs blocks of 64 rows (AVX512; 32 with AVX2) and a partial last block
    # in another format, so parts that are not whole blocks are packed again (int4_cpu_pack.cat_cpu_int4pack).
    # Triton's layout: packed [N, K/2] rows, scales/zeros [K/g, N] columns; the mma kernel's: whole 16-row tiles on
    # dim 0 of both (int4_mma.pack). The check below is the proof on
    # this device.
    merged = Int4Linear.__new__(Int4Linear)
    nn.Module.__init__(merged)
    merged.in_features, merged.out_features = p0.in_features, sum(p.out_features for p in parts)
    merged.group_size, merged.kernel, merged.compute_dtype = p0.group_size, p0.kernel, p0.compute_dtype
    merged.rows_kernel, merged.int4pack_kernel = p0.rows_kernel, p0.int4pack_kernel
    merged.int4pack_rows = min(p.int4pack_rows for p in parts) if p0.kernel == "mma" else 0
    if merged.int4pack_rows:                           # as Int4Linear._hold would decide for the merged shape
        merged.int4pack_rows = min(merged.int4pack_rows, mma_int4pack_rows(merged.out_features, merged.in_features))
    merged.kernel_reason = getattr(p0, "kernel_reason", None)
    merged.register_buffer("input_perm", perm)
    packed = {}
    for name, dim in (("weight_packed", 0), ("scales_and_zeros", 1), ("triton_packed", 0), ("triton_scales", 1),
                      ("triton_zeros", 1), ("triton_paired", 1), ("mma_words", 0), ("mma_scales", 0)):
        if not hasattr(p0, name) or (p0.kernel == "mma" and name in ("weight_packed", "scales_and_zeros")
                                      and not merged.int4pack_rows):
            continue
        if name == "weight_packed" and p0.int4pack_kernel == "cpu-int4pack":
            packed[name] = cat_cpu_int4pack([(p.weight_packed, p.out_features) for p in parts], p0.in_features)
        else:
            packed[name] = torch.cat([getattr(p, name) for p in parts], dim=dim).contiguous()
        merged.register_buffer(name, packed[name])
    merged.bias = None if p0.bias is None else nn.Parameter(torch.cat([p.bias for p in parts]), requires_grad=False)
    if merged.kernel == "mma":                         # its split-K needs differ from the parts' (graphs capture them)
        from model_server import int4_mma
        int4_mma.reserve(packed["mma_words"].device, merged.out_features, merged.in_features,
                          mma_max_rows(merged.out_features))
    if not _agrees(merged, parts):
        return None
    for name in ("weight_packed", "triton_packed", "mma_words"):   # packed weights become views of the merged rows
        if name in packed:                             # (scales are small: kept), where those rows are the
            row = 0                                    # part's own (a CPU part of a partial block keeps its own)
            for p in parts:
                n = getattr(p, name).shape[0]
                rows = packed[name][row:row + n]
                if torch.equal(rows, getattr(p, name)):
                    setattr(p, name, rows)
                row += n
    return merged


def _agrees(merged: Int4Linear, parts: list[Int4Linear]) -> bool:
    """The merged module against its parts on random inputs: 3 rows and 16 rows (past int4.tinygemm_max_rows,
    so both kernels of a dispatching module run). int4pack must agree bit for bit; Triton's and the mma kernel's
    split-K choices depend on N, so their sums may round differently: within 2 % (a layout error is ~100 %)."""
    p0 = parts[0]
    for rows in (3, 16):
        x = torch.randn(rows, p0.in_features, device=next(merged.buffers()).device, dtype=p0.compute_dtype)
        with torch.inference_mode():
            want = torch.cat([p(x) for p in parts], dim=-1)
            got = merged(x)
        exact = merged.step_kernel(rows) not in ("triton", "mma")
        err = float((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-12))
        if (exact and not torch.equal(got, want)) or err > 0.02:
            log.warning("merged INT4 projection disagrees with its parts at %d rows (rel. error %.3g); "
                        "left separate", rows, err)
            return False
    return True


def merge(parts: list[nn.Module]) -> Merged | None:
    """One module computing every part's output from one GEMM, or None when these parts cannot merge."""
    if len(parts) < 2:
        return None
    if all(type(p) is nn.Linear for p in parts):
        fn = _merge_linear(parts)
    elif all(isinstance(p, Int4Linear) for p in parts):
        fn = _merge_int4(parts)
    else:
        return None
    return None if fn is None else Merged(fn, [p.out_features for p in parts])
