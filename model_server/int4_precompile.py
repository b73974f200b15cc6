"""Compile every launch variant of the INT4 Triton GEMM that a model's INT4 linears can run, once each.

The GEMM (:mod:`model_server.int4_triton`) is compiled per launch configuration, and
:func:`~model_server.int4_triton.choose_config` picks the configuration from a step's rows (tile height, split K),
so a server compiles a new variant the first time a step of a new size class reaches a layer: a stall of every
stream in that step, once per variant and start, unless the compile cache already holds it. ``model-server
compile-cache fill`` sets ``MODEL_SERVER_FAST_PRECOMPILE_INT4=1`` for the server it drives, whose background
warm-up then calls :func:`precompile`, so the cache it ships holds every variant, not only those its requests met.

The CUDA mma kernel (:mod:`model_server.int4_mma`, ``MODEL_SERVER_INT4_KERNELS=mma``/``auto``) is compiled per
configuration too: :func:`precompile_mma` compiles each one its layers can pick. The background warm-up calls it on
every start, first thing (NVRTC, off the engine thread), so a step of a new row class does not wait for a compile on the
engine thread; under ``compile-cache fill`` that also puts every cubin in the seed.

Owns enumerating the variants (:func:`variants`) and running each once per layer shape on zeros. Must NOT choose
configurations (``int4_triton.choose_config`` / ``int4_mma.choose_config`` do) or decide when this runs (the warm-up
does).
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from model_server import int4_dequant, int4_triton, int4_triton_split, switches
from model_server.int4 import Int4Linear


def enabled() -> bool:
    """``MODEL_SERVER_FAST_PRECOMPILE_INT4``: ``1`` on, unset or ``0`` off; anything else raises ValueError."""
    return switches.flag("MODEL_SERVER_FAST_PRECOMPILE_INT4") is True


def variant(m: int, n: int, k: int, bk: int, num_sms: int) -> tuple[int4_triton.Config, str]:
    """What a launch of ``m`` rows compiles: ``choose_config``'s configuration and its split-K reduction (``ticket`` or
    ``kernel`` from :func:`model_server.int4_triton_split.reduction`; ``none`` without a split): the ticket is a
    kernel variant of its own."""
    cfg = int4_triton.choose_config(m, n, k, bk, num_sms)
    return cfg, int4_triton_split.reduction(m) if cfg.split_k > 1 else "none"


def variants(n: int, k: int, bk: int, num_sms: int, max_rows: int,
             min_rows: int = 1) -> dict[tuple[int4_triton.Config, str], int]:
    """Every :func:`variant` that ``min_rows``..``max_rows`` rows of an ``n x k`` layer launch, each with the fewest
    rows that launch it. Above 128 rows only the count of 128-row tiles changes the choice, so one row count per tile
    count is tried, and the walk stops once the split is 1 (more rows pick the same)."""
    out: dict[tuple[int4_triton.Config, str], int] = {}
    m = max(1, min_rows)
    while m <= max_rows:
        cfg, reduce = variant(m, n, k, bk, num_sms)
        out.setdefault((cfg, reduce), m)
        if m > 64 and cfg.split_k == 1:
            break
        m = m + 1 if m < 128 else m + 128
    return out


def _first_rows(layer: Int4Linear) -> int:
    """The fewest rows with which ``layer`` runs the Triton GEMM (0: never)."""
    return next((r for r in range(1, 65) if layer.runs_triton(r)), 0)


def mma_layers(modules: Iterable[nn.Module]) -> list[Int4Linear]:
    """The INT4 linears among ``modules`` (and their children) that run the CUDA mma kernel."""
    return [layer for module in modules for layer in module.modules()
            if isinstance(layer, Int4Linear) and layer.kernel == "mma"]


def precompile_mma(modules: Iterable[nn.Module], glu: Iterable[nn.Module] = ()) -> int:
    """Compile (NVRTC, into the compile cache's ``int4_mma/``) every configuration of the CUDA mma kernel that steps
    of up to ``int4.mma_max_rows(n)`` rows pick on each distinct INT4 layer shape among ``modules`` running it, and
    for the merged gate/up projections in ``glu`` their GLU epilogue's (:mod:`model_server.int4_mma_glu`); no
    launch. Returns the configurations compiled or loaded (each once per process: ``int4_mma_build.kernel``)."""
    from model_server import int4_mma, int4_mma_glu
    from model_server.int4 import mma_max_rows
    glu_ids = {id(layer) for layer in mma_layers(glu)} if int4_mma_glu.on() else set()
    names: set[tuple[str, int]] = set()
    for layer in {id(layer): layer for layer in mma_layers([*modules, *glu])}.values():   # each layer once
        dev = layer.mma_words.device
        sms = int4_mma._num_sms(dev)
        for rows in range(layer.int4pack_rows + 1, mma_max_rows(layer.out_features) + 1):   # fewer rows: int4pack
            cfg = int4_mma.choose_config(rows, layer.out_features, layer.in_features, sms)
            names.add((cfg.name(), int4_mma.device_index(dev)))
            gcfg = int4_mma_glu.glu_config(rows, layer.out_features, layer.in_features, sms) \
                if id(layer) in glu_ids else None
            if gcfg is not None:
                names.add((gcfg.name(), int4_mma.device_index(dev)))
    for name, index in sorted(names):
        int4_mma.kernel(name, index)
    return len(names)


def precompile(modules: Iterable[nn.Module], max_rows: int, glu: Iterable[Int4Linear] = ()) -> int:
    """Run every GEMM variant (:func:`variants`) that steps of up to ``max_rows`` rows can launch on each distinct
    INT4 layer shape among ``modules`` (and their children), on zeros, and the dequantization kernel of
    :mod:`model_server.int4_dequant` where steps of ``max_rows`` take it (rows from its bound on run no GEMM variant);
    returns the launches made. Layers that never run the Triton GEMM are skipped. Layers in ``glu`` (merged gate/up
    projections whose GLU epilogue is on: :mod:`model_server.int4_triton_glu`) also run each variant without split K
    with the epilogue. Compiles land in Triton's cache (``TRITON_CACHE_DIR``)."""
    from model_server.int4_triton_glu import int4_triton_glu
    glu_ids = {id(layer) for layer in glu}
    seen: set[tuple] = set()
    launches = 0
    with torch.inference_mode():
        for module in modules:
            for layer in module.modules():
                if not isinstance(layer, Int4Linear) or not layer.uses_triton:
                    continue
                first = _first_rows(layer)
                dev = layer.triton_packed.device
                key = (layer.out_features, layer.in_features, layer.group_size, layer.compute_dtype, str(dev), first,
                       id(layer) in glu_ids)
                if not first or key in seen:
                    continue
                seen.add(key)
                sms = int4_triton._num_sms(dev)
                top = max_rows
                if int4_dequant.takes(max_rows):     # prefill-sized steps dequantize, then cuBLAS: one kernel
                    top = int4_dequant.min_rows() - 1
                    int4_dequant.dequantize(layer.triton_packed, *layer._gemm_scales(), layer.group_size,
                                            layer.compute_dtype)
                    launches += 1
                found = variants(layer.out_features, layer.in_features, int4_triton.block_k(layer.group_size), sms,
                                 top, first) if top >= first else {}
                for (cfg, _), rows in found.items():
                    x = torch.zeros(rows, layer.in_features, device=dev, dtype=layer.compute_dtype)
                    weights = (layer.triton_packed, *layer._gemm_scales(), layer.group_size)
                    int4_triton.int4_triton_mm(x, *weights, config=cfg)
                    launches += 1
                    if id(layer) in glu_ids and cfg.split_k == 1:
                        launches += int4_triton_glu(x, *weights, config=cfg) is not None
    return launches
