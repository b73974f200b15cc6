"""GPTQ- and AWQ-format checkpoints written from a float one, for tests: the formats as gptqmodel and AutoAWQ save
them, written independently of :mod:`model_server.int4_repack` (numpy, one nibble at a time), and the weights they
stand for.

The values are round-to-nearest per group, not GPTQ's or AWQ's search: the repack reads the format, not how its
numbers were chosen. ``scripts/check_gptq.py`` reads what this writes with gptqmodel itself.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
SHARED_INPUT = {"self_attn.k_proj": "self_attn.q_proj", "self_attn.v_proj": "self_attn.q_proj",
                "mlp.up_proj": "mlp.gate_proj"}


def _pack_rows(vals: np.ndarray) -> np.ndarray:
    """uint [8R, C] in 0..15 -> int32 [R, C]: row 8r + j in bits 4j of row r."""
    out = np.zeros((vals.shape[0] // 8, vals.shape[1]), dtype=np.uint32)
    for j in range(8):
        out |= vals[j::8].astype(np.uint32) << np.uint32(4 * j)
    return out.view(np.int32)


def _pack_cols(vals: np.ndarray) -> np.ndarray:
    """uint [R, 8C] in 0..15 -> int32 [R, C]: column 8c + j in bits 4j of column c."""
    out = np.zeros((vals.shape[0], vals.shape[1] // 8), dtype=np.uint32)
    for j in range(8):
        out |= vals[:, j::8].astype(np.uint32) << np.uint32(4 * j)
    return out.view(np.int32)


def quantize(w: np.ndarray, group_size: int, sym: bool, g_idx: np.ndarray, v1: bool):
    """w float [N, K] -> (q [K, N], zeros [G, N], scales fp16 [G, N]); group of column k is g_idx[k]."""
    n, k = w.shape
    groups = k // group_size
    q = np.zeros((k, n), dtype=np.int64)
    zeros = np.zeros((groups, n), dtype=np.int64)
    scales = np.zeros((groups, n), dtype=np.float16)
    for g in range(groups):
        cols = np.nonzero(g_idx == g)[0]
        wg = w[:, cols]
        if sym:
            s = np.maximum(np.abs(wg).max(axis=1) / 7.5, 1e-6)
            z = np.full(n, 8)
        else:
            lo, hi = np.minimum(wg.min(axis=1), 0), np.maximum(wg.max(axis=1), 0)
            s = np.maximum((hi - lo) / 15, 1e-6)
            z = np.clip(np.round(-lo / s), 1 if v1 else 0, 15).astype(np.int64)     # v1 stores z - 1 >= 0
        s = s.astype(np.float16)
        scales[g], zeros[g] = s, z
        q[cols] = np.clip(np.round(wg / s.astype(np.float64)[:, None]).T + z[None, :], 0, 15)
    return q, zeros, scales


def dequantize(q: np.ndarray, zeros: np.ndarray, scales: np.ndarray, g_idx: np.ndarray) -> np.ndarray:
    """The weight a GPTQ linear stands for, float64 [N, K]: scales[g_idx[k], n] * (q[k, n] - zeros[g_idx[k], n])."""
    return (scales.astype(np.float64)[g_idx] * (q - zeros[g_idx])).T


AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)     # AWQ's packing: nibble p of an int32 holds output 8c + AWQ_ORDER[p]


def _write(src: Path, dst: Path, qconfig: dict, one) -> dict[str, np.ndarray]:
    """``dst``: ``src`` with every decoder linear replaced by ``one(name, w)``'s tensors (it returns them and the weight
    they stand for), the rest fp16, ``qconfig`` as config.json's ``quantization_config``."""
    shutil.copytree(src, dst)
    state = load_file(str(src / "model.safetensors"))
    out: dict[str, torch.Tensor] = {}
    ref: dict[str, np.ndarray] = {}
    for key, t in state.items():
        name = key[: -len(".weight")]
        suffix = name.split(".", 3)[-1] if name.startswith("model.layers.") else ""
        if suffix not in LINEARS or not key.endswith(".weight"):
            out[key] = t.to(torch.float16)
            continue
        tensors, ref[name] = one(name, suffix, t.float().numpy())
        out.update({f"{name}.{part}": torch.from_numpy(v) for part, v in tensors.items()})
    save_file(out, str(dst / "model.safetensors"))
    cfg = json.loads((src / "config.json").read_text())
    cfg["dtype"] = "float16"
    cfg["quantization_config"] = qconfig
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    return ref


def write_gptq(src: Path, dst: Path, group_size: int = 32, fmt: str = "gptq", sym: bool = True,
               desc_act: bool = False, seed: int = 0) -> dict[str, np.ndarray]:
    """``dst``: ``src`` (a float ``model.safetensors`` directory) with every decoder linear in GPTQ format, the rest
    fp16; returns each linear's dequantized weight (module name -> float64 [N, K]). ``desc_act``: a random column
    order per input (shared by the linears that read one input, as GPTQ's act order is)."""
    rng = np.random.default_rng(seed)
    orders: dict[str, np.ndarray] = {}

    def one(name: str, suffix: str, w: np.ndarray):
        k = w.shape[1]
        g_idx = np.arange(k) // group_size
        if desc_act:
            owner = name.rsplit(".", 2)[0] + "." + SHARED_INPUT.get(suffix, suffix)
            perm = orders.setdefault(owner, rng.permutation(k))
            g_idx = np.empty(k, dtype=np.int64)
            g_idx[perm] = np.arange(k) // group_size
        q, zeros, scales = quantize(w, group_size, sym, g_idx, fmt == "gptq")
        stored = zeros - 1 if fmt == "gptq" else zeros
        return ({"qweight": _pack_rows(q), "qzeros": _pack_cols(stored), "scales": scales,
                 "g_idx": g_idx.astype(np.int32)}, dequantize(q, zeros, scales, g_idx))

    return _write(src, dst, {"quant_method": "gptq", "bits": 4, "group_size": group_size, "desc_act": desc_act,
                             "sym": sym, "checkpoint_format": fmt, "true_sequential": True}, one)


def write_awq(src: Path, dst: Path, group_size: int = 32) -> dict[str, np.ndarray]:
    """``dst``: ``src`` with every decoder linear in AWQ's GEMM format (asymmetric, zero points; packed along the
    outputs in AWQ's interleaved order), the rest fp16; returns each linear's dequantized weight."""
    def one(name: str, suffix: str, w: np.ndarray):
        k, n = w.shape[1], w.shape[0]
        g_idx = np.arange(k) // group_size
        q, zeros, scales = quantize(w, group_size, False, g_idx, False)
        order = (np.arange(n).reshape(-1, 8)[:, list(AWQ_ORDER)]).reshape(-1)   # packed column p <- natural order[p]
        return ({"qweight": _pack_cols(q[:, order]), "qzeros": _pack_cols(zeros[:, order]), "scales": scales},
                dequantize(q, zeros, scales, g_idx))

    return _write(src, dst, {"quant_method": "awq", "bits": 4, "group_size": group_size, "version": "gemm",
                             "zero_point": True}, one)
