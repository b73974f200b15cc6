"""Launch-configuration grids and the per-shape sweep of ``benchmarks/int4_kernels.py``.

Owns: which configurations of the Triton GEMM (``model_server/int4_triton.py``) and of the small-rows kernel
(``model_server/int4_gemv.py``) a sweep tries at a given M, and :func:`sweep`, which times each one (CUDA graph,
weights from HBM) and checks its output against the float32 reference. Timing and shapes are int4_kernels.py's.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable

import torch

from model_server import int4_gemv, int4_triton


def gemm_configs(m: int, n: int, k: int, group: int, num_sms: int, wide: bool = False) -> list[int4_triton.Config]:
    """The GEMM's grid, each dequantizing as the served configuration at ``m`` does (``choose_config``'s ``fma`` /
    ``ptx``: ``MODEL_SERVER_INT4_TRITON_DEQ``)."""
    base = int4_triton.choose_config(m, n, k, int4_triton.block_k(group), num_sms)
    return [dataclasses.replace(c, fma=base.fma, ptx=base.ptx) for c in _grid(m, k, group, wide, base)]


def _grid(m: int, k: int, group: int, wide: bool, base: int4_triton.Config) -> list[int4_triton.Config]:
    """The GEMM's grid. Up to 16 rows: swap-AB, BLOCK_N 64/128, split K 1/heuristic's, both scale modes.
    17..64 rows: BLOCK_M = M padded, BLOCK_N 64/128, split K 1/heuristic's/2x, stages 3/5, both scale modes (swap-AB);
    ``wide``: dequantizing only, BLOCK_N 64/128/256 x 4/8 warps x stages 3/4 x split K heuristic's / half / 2x.
    Above 64: BLOCK_M 64/128 x BLOCK_N 64/128 x both orders and modes; ``wide``: split K 1/2/4/8 too."""
    iters = k // int4_triton.block_k(group)

    def splits(extra: bool) -> list[int]:
        out = sorted({1, base.split_k} | ({base.split_k * 2} if extra else set()))
        return [s for s in out if iters % s == 0 and iters // s >= 2]

    if m > 64:
        if wide:
            return [int4_triton.Config(bm, bn, sp, 3, 8 if bm * bn >= 16384 else 4, False, fold)
                    for bm in (64, 128) for bn in (64, 128) for sp in (1, 2, 4, 8)
                    if iters % sp == 0 and iters // sp >= 2 for fold in (True, False)]
        return [int4_triton.Config(bm, bn, sp, 3, 8 if bm * bn >= 8192 else 4, swap, fold)
                for bm in (64, 128) for bn in (64, 128) for sp in splits(False)
                for swap in (True, False) for fold in (True, False)]
    if m <= 16:
        return [int4_triton.Config(base.block_m, bn, sp, 4, 4, True, fold)
                for bn in (64, 128) for sp in splits(False) for fold in (True, False)]
    if wide:
        half = {max(base.split_k // 2, 1), base.split_k, base.split_k * 2}
        return [int4_triton.Config(base.block_m, bn, sp, st, w, True, False)
                for bn in (64, 128, 256) for w in (4, 8) for st in (3, 4) for sp in sorted(half)
                if iters % sp == 0 and iters // sp >= 2 and not (bn == 256 and w == 4)]
    return [int4_triton.Config(base.block_m, bn, sp, st, 8 if base.block_m * bn >= 8192 else 4, True, fold)
            for bn in (64, 128) for sp in splits(True) for st in (3, 5) for fold in (True, False)]


def _auto_split(n: int, kblocks: int, bn: int, nb: int, num_sms: int) -> int:
    split = 1
    while -(-n // bn) * split < 2 * num_sms and kblocks >= 4 * split * nb:
        split *= 2
    return split


def gemv_configs(m: int, n: int, k: int, group: int, num_sms: int) -> list[int4_gemv.GemvConfig]:
    """The small-rows kernel's grid: (BLOCK_N, K-blocks per iteration, warps) tiles, stages, split K 1 and the one that
    gives >= 2 programs per SM. One row: CUDA cores (+2 tensor-core tiles); more rows: tensor cores with BLOCK_N 16
    and one K-block per warp (M padded to 16, or to M's power of two above 16). Chosen with the kernel compiled for
    sm_90 without a GPU (benchmarks/int4_compile_check.py, Triton 3.6): these tiles take ~9.5 SASS instructions per
    weight in the main loop, tensor-core strips wider than 16 columns 17-42, CUDA cores at 2-8 rows 13-33; none
    spills registers."""
    kblocks = k // int4_triton.block_k(group)
    out: list[int4_gemv.GemvConfig] = []

    def add(tiles, bm: int, dot: bool, stages=(4,)) -> None:
        for bn, nb, w in tiles:
            for st in stages:
                for sp in sorted({1, _auto_split(n, kblocks, bn, nb, num_sms)}):
                    cfg = int4_gemv.GemvConfig(bn, nb, bm, sp, st, w, dot)
                    if cfg not in out:
                        out.append(cfg)

    def no_prefetch(tile, bm: int, dot: bool) -> None:         # the scale prefetch on/off, at the default tile
        for sp in sorted({1, _auto_split(n, kblocks, tile[0], tile[1], num_sms)}):
            out.append(int4_gemv.GemvConfig(tile[0], tile[1], bm, sp, 4, tile[2], dot, False))

    bm = max(16, 1 << max(0, (m - 1).bit_length()))
    if m == 1:
        no_prefetch((16, 4, 4), 1, False)
        add([(16, 4, 4), (32, 2, 4), (8, 4, 2), (16, 8, 8), (64, 2, 8)], 1, False)
        add([(16, 4, 4)], 1, False, (2, 6))
        add([(16, 4, 4), (16, 2, 2)], 16, True)
    elif m <= 16:
        add([(16, 4, 4), (16, 2, 2), (16, 8, 8)], bm, True, (3, 5))
        add([(16, 4, 4)], bm, True, (2, 7))
        no_prefetch((16, 4, 4), bm, True)
    else:
        add([(16, 4, 4), (16, 2, 2)], bm, True, (2, 3))
    return out


def cfg_str(c: dict) -> str:
    """GEMM: BLOCK_M/BLOCK_N/split/stages/warps/order+mode; small-rows kernel: gemv BLOCK_N/NB/BLOCK_M/split/..."""
    if "nb" in c:
        return (f"{'tc' if c['dot'] else 'cc'} {c['block_n']}/nb{c['nb']}/m{c['block_m']}/s{c['split']}/"
                f"st{c['num_stages']}/w{c['num_warps']}" + ("" if c.get("prefetch", True) else "/nopf"))
    return (f"{c['block_m']}/{c['block_n']}/s{c['split_k']}/st{c['num_stages']}/w{c['num_warps']}/"
            f"{'T' if c['swap_ab'] else 'N'}{'F' if c['fold'] else 'D'}")


REPEATS = 4                          # calls per config compared bit for bit


def sweep(make_calls: Callable[[str, object], list], check: Callable[[Callable[[], torch.Tensor]], float],
          configs: list[tuple[str, object]], reps: int, time_calls: Callable, deadline: float,
          label: str) -> list[dict]:
    """Time every ``(method, config)`` (graph us per call) and check its error and that ``REPEATS`` calls give the
    same bits (``deterministic``: 3-stage pipelines raced on an H100, docs/benchmarks.md "INT4 at 64 streams, second
    pass"); stops at ``deadline`` (time.time()). A config that fails to compile or run is recorded with its error, not
    timed."""
    out = []
    for method, cfg in configs:
        if time.time() > deadline:
            print(f"{label}: sweep budget spent, {len(configs) - len(out)} configs not tried", flush=True)
            break
        row: dict = {"method": method, "config": vars(cfg)}
        try:
            calls = make_calls(method, cfg)
            row["rel_err"] = check(calls[0])
            first = calls[0]().clone()
            row["deterministic"] = all(torch.equal(first, calls[0]()) for _ in range(REPEATS - 1))
            row["graph_us"] = time_calls(calls, reps, False)[1]
        except Exception as e:                      # noqa: BLE001 - keep the other configs' numbers
            row["error"] = f"{e!r}"[:300]
            print(f"{label} {method} {cfg_str(row['config'])}: {row['error']}", flush=True)
        out.append(row)
    return out


def best_of(rows: list[dict], method: str, max_err: float = 1e-2) -> dict | None:
    """The fastest timed row of ``method`` whose error is below ``max_err`` and whose repeated calls agreed (rows of
    sweeps from before that check count as agreeing)."""
    ok = [r for r in rows if r["method"] == method and r.get("graph_us") is not None
          and isinstance(r.get("rel_err"), float) and r["rel_err"] < max_err and r.get("deterministic", True)]
    return min(ok, key=lambda r: r["graph_us"]) if ok else None
