"""Pre-quantized 4-bit checkpoints (GPTQ, AWQ) repacked onto ``--quantization int4``'s kernels at load: no gptqmodel.

**GPTQ** (``quant_method: gptq``, as gptqmodel and AutoGPTQ save it), per quantized linear ``P`` with ``N`` outputs
and ``K`` inputs:

* ``P.qweight`` int32 ``[K/8, N]``: input column ``k = 8r + j`` of output ``n`` in bits ``4j..4j+3`` of ``qweight[r, n]``;
* ``P.qzeros`` int32 ``[G, N/8]``: the zero point of group ``g``, output ``n = 8c + j``, in bits ``4j..4j+3`` of
  ``qzeros[g, c]``; checkpoint format ``gptq`` (v1, the default) stores ``z - 1``, ``gptq_v2`` stores ``z``;
* ``P.scales`` float ``[G, N]``; ``P.g_idx`` int32 ``[K]``: each input column's group; ``P.bias`` (optional) ``[N]``.

**AWQ** (``quant_method: awq``, ``version: gemm``, as AutoAWQ and gptqmodel save it): ``P.qweight`` int32
``[K, N/8]`` and ``P.qzeros`` int32 ``[G, N/8]`` packed along the outputs, output ``n = 8c + ORDER[p]`` in bits
``4p..4p+3`` of element ``c`` (``AWQ_ORDER`` interleaves them), stored zeros are ``z``; ``P.scales`` ``[G, N]``; groups
are contiguous (``g = k // group_size``).

Either way the weight is ``W[n, k] = scales[g, n] * (q[k, n] - z[g, n])``. :mod:`model_server.int4`'s layout computes
``W'[n, k] = (q - 8) * scale + zero`` over contiguous groups of ``group_size`` columns, so a linear becomes an
:class:`~model_server.int4.Int4Linear` with the same 4-bit values and::

    scale = s            zero = s * (8 - z)

exact up to rounding ``scale`` and ``zero`` to the compute dtype (bf16 from compute capability 8.0 and on CPU:
8 bits of mantissa against the checkpoint's fp16 11; fp16 below 8.0). GPTQ's act order (``desc_act``: ``g_idx`` not
``k // group_size``): GPTQ fills each group with exactly ``group_size`` columns, so a stable sort of ``g_idx``
(``perm``) makes the groups contiguous, and the linear computes ``x[:, perm] @ W[:, perm]^T`` (a gather of the
input per call, ``Int4Linear.input_perm``).

Owns reading a checkpoint's settings (:func:`spec`, :func:`unsupported_reason`) and turning its tensors into INT4
linears (:func:`take_linears`). Building the model around them is :mod:`model_server.native.build`'s.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from model_server.int4 import GROUP_SIZES, INNER_K_TILES, ComputeChoice, Int4Linear

GPTQ_FORMATS = {"gptq": 1, "gptq_v2": 0}      # checkpoint format -> what is added to a stored zero point
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)         # AWQ: nibble p of a packed int32 holds output 8c + AWQ_ORDER[p]
PARTS = ("qweight", "qzeros", "scales", "g_idx", "bias")
_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)      # nibble j of an int32 at bits 4j..4j+3


class RepackUnsupported(ValueError):
    """This checkpoint cannot be repacked (the message says why, for the loader's log line)."""


@dataclass(frozen=True)
class RepackSpec:
    """What the repack needs from ``quantization_config``."""

    method: str               # "gptq" | "awq"
    group_size: int
    zero_offset: int = 0      # GPTQ: 1 for format "gptq" (stored z - 1), 0 for "gptq_v2"
    desc_act: bool = False


def spec(config: dict[str, Any] | None) -> RepackSpec:
    """The repack settings of a ``config.json`` dict; :class:`RepackUnsupported` when it is not a 4-bit GPTQ or AWQ
    (GEMM) checkpoint whose groups the int4pack layout holds."""
    qc = (config or {}).get("quantization_config") or {}
    method = str(qc.get("quant_method", "")).lower()
    if method not in ("gptq", "awq"):
        raise RepackUnsupported(f"not a GPTQ or AWQ checkpoint (quant_method {method or None})")
    name = method.upper()
    bits = qc.get("bits", qc.get("w_bit"))
    if bits != 4:
        raise RepackUnsupported(f"{name} bits {bits} (the INT4 kernels take 4)")
    group = qc.get("group_size", qc.get("q_group_size", -1))
    if group not in GROUP_SIZES:
        raise RepackUnsupported(f"{name} group_size {group} (the INT4 kernels take {', '.join(map(str, GROUP_SIZES))})")
    if str(qc.get("pack_dtype", "int32")).replace("torch.", "") != "int32":
        raise RepackUnsupported(f"{name} pack_dtype {qc.get('pack_dtype')!r} (repacked: int32)")
    if qc.get("dynamic"):
        raise RepackUnsupported(f"{name} per-module overrides (dynamic)")
    if method == "awq":
        version = str(qc.get("version", "gemm")).lower()
        if version != "gemm":
            raise RepackUnsupported(f"AWQ version {version!r} (repacked: gemm)")
        if not qc.get("zero_point", True):
            raise RepackUnsupported("AWQ without zero points (repacked: zero_point true)")
        return RepackSpec("awq", group)
    fmt = str(qc.get("checkpoint_format") or qc.get("format") or "gptq").lower()
    if fmt not in GPTQ_FORMATS:
        raise RepackUnsupported(f"GPTQ checkpoint format {fmt!r} (repacked: {', '.join(GPTQ_FORMATS)})")
    return RepackSpec("gptq", group, GPTQ_FORMATS[fmt], bool(qc.get("desc_act", False)))


def unsupported_reason(config: dict[str, Any] | None) -> str | None:
    """Why :func:`spec` refuses ``config`` (None: the checkpoint can be repacked)."""
    try:
        spec(config)
    except RepackUnsupported as exc:
        return str(exc)
    return None


def _nibbles(packed: torch.Tensor, dim: int) -> torch.Tensor:
    """int32 ``packed`` with 8 nibbles per element -> uint8 values, the nibbles laid out along ``dim`` (0 or 1)."""
    shifts = _SHIFTS.to(packed.device)
    if dim == 0:                                    # [R, C] -> [R, 8, C] -> [8R, C]
        vals = (packed.unsqueeze(1) >> shifts.view(1, 8, 1)) & 15
        return vals.reshape(-1, packed.shape[1]).to(torch.uint8)
    vals = (packed.unsqueeze(2) >> shifts.view(1, 1, 8)) & 15       # [R, C] -> [R, C, 8] -> [R, 8C]
    return vals.reshape(packed.shape[0], -1).to(torch.uint8)


def _awq_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """AWQ's int32 ``[R, C]`` -> uint8 ``[R, 8C]`` in natural output order (nibble p is output 8c + AWQ_ORDER[p])."""
    vals = _nibbles(packed, 1).view(packed.shape[0], -1, 8)
    natural = torch.empty_like(vals)
    natural[..., list(AWQ_ORDER)] = vals
    return natural.view(packed.shape[0], -1)


def group_order(g_idx: torch.Tensor | None, k: int, group_size: int) -> torch.Tensor | None:
    """None when ``g_idx`` is ``k // group_size`` (or absent); else the stable order that makes every group
    contiguous. :class:`RepackUnsupported` when a group does not hold exactly ``group_size`` columns."""
    plain = torch.arange(k, device=None if g_idx is None else g_idx.device) // group_size
    if g_idx is None or torch.equal(g_idx.to(torch.int64), plain):
        return None
    perm = torch.sort(g_idx.to(torch.int64), stable=True).indices
    if not torch.equal(g_idx.to(torch.int64)[perm], plain):
        raise RepackUnsupported("GPTQ g_idx whose groups are not all group_size columns")
    return perm


def repack(parts: dict[str, torch.Tensor], sp: RepackSpec, choice: ComputeChoice, name: str = "") -> Int4Linear:
    """One checkpoint linear (its ``qweight``, ``qzeros``, ``scales``, GPTQ's optional ``g_idx``, optional ``bias``,
    on the target device) as an :class:`~model_server.int4.Int4Linear` (module docstring)."""
    qweight, qzeros, scales = parts["qweight"], parts["qzeros"], parts["scales"]
    if sp.method == "awq":
        k, n = qweight.shape[0], qweight.shape[1] * 8
    else:
        k, n = qweight.shape[0] * 8, qweight.shape[1]
    groups = k // sp.group_size
    if (qweight.dtype != torch.int32 or qzeros.dtype != torch.int32 or k % sp.group_size
            or tuple(scales.shape) != (groups, n) or tuple(qzeros.shape) != (groups, n // 8) or n % 8):
        raise RepackUnsupported(f"{name}: {sp.method.upper()} tensors of unexpected shapes or types (qweight "
                                f"{tuple(qweight.shape)} {qweight.dtype}, qzeros {tuple(qzeros.shape)}, "
                                f"scales {tuple(scales.shape)}, group size {sp.group_size})")
    if k % (16 * INNER_K_TILES):
        raise RepackUnsupported(f"{name}: {k} inputs (the int4pack layout needs a multiple of {16 * INNER_K_TILES})")
    perm = None
    if sp.method == "awq":
        q = _awq_nibbles(qweight).t()                             # [K, N] -> [N, K]
        z = _awq_nibbles(qzeros).float()                          # [G, N]
    else:
        g_idx = parts.get("g_idx")
        perm = group_order(g_idx, k, sp.group_size) if g_idx is not None else None
        q = _nibbles(qweight, 0).t()                              # [N, K]
        if perm is not None:
            q = q[:, perm]
        z = _nibbles(qzeros, 1).float() + sp.zero_offset         # [G, N]
    s = scales.float()
    sz = torch.stack([s, s * (8 - z)], dim=-1)                    # [G, N, 2]
    return Int4Linear.from_quantized(q.contiguous(), sz, sp.group_size, choice, parts.get("bias"), perm)


def take_linears(state: dict[str, torch.Tensor], sp: RepackSpec, choice: ComputeChoice) -> dict[str, Int4Linear]:
    """Every quantized linear in ``state`` (module name -> INT4 linear); their tensors are removed from ``state``."""
    prefixes = sorted(key[: -len(".qweight")] for key in state if key.endswith(".qweight"))
    linears = {}
    for prefix in prefixes:
        parts = {p: state.pop(f"{prefix}.{p}") for p in PARTS if f"{prefix}.{p}" in state}
        linears[prefix] = repack(parts, sp, choice, prefix)
        del parts
    return linears
