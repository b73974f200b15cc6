"""Can a Triton GEMV beat cuBLAS on the decode step's projections at 1-8 rows? (a probe for issue 17)

At batch 1 a bf16 decode step is bound by its GEMMs (docs/benchmarks.md, "Rotary and K/V writes as one
kernel"): cuBLAS reads the small merged projections (q/k/v 12 MB, o 8 MB) at 1.7-2 TB/s against a copy
bandwidth of 4.2 TB/s. This probe times, per projection shape of the llama-3.2-1b preset and per row count,
``F.linear`` (cuBLAS) against a plain Triton GEMV (each program: ``BLOCK_N`` output columns for all rows,
looping over K in ``BLOCK_K`` chunks, each weight tile read once for all rows, fp32 accumulation) over a sweep of its configs. Each candidate is
checked against ``F.linear`` first (max relative error, 1e-2 at most), then timed as the step runs it: 50
calls recorded in one CUDA graph, replayed, CUDA events, median of 20 replays, per call.

Nothing in the model server uses this kernel: the answer decides whether one should. CPU smoke
(``TRITON_INTERPRET=1``, tiny shapes, correctness only): ``python benchmarks/gemv_probe.py --smoke``.
Writes ``--out/gemv_probe.json`` and a table.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from support import default_commit, utc_date  # noqa: E402

# llama-3.2-1b merged projections: name -> (N out, K in)
SHAPES = {"qkv": (3072, 2048), "o": (2048, 2048), "gate_up": (16384, 2048), "down": (2048, 8192),
          "lm_head": (128256, 2048)}
CONFIGS = [(bn, bk, w) for bn in (4, 8, 16) for bk in (256, 512) for w in (4, 8)]   # 12: ~100 compiles in all

triton: Any = None
tl: Any = None
_kernel: Any = None


def _gemv_kernel(x_ptr, w_ptr, y_ptr, N, M, K: tl.constexpr, M_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    """y[m, n] = sum_k x[m, k] w[n, k] for BLOCK_N columns n of this program and every row m < M (M_PAD: M
    rounded up to a power of two); each weight tile is read once for all rows."""
    pid = tl.program_id(0)
    n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    m = tl.arange(0, M_PAD)
    nmask = n < N
    mmask = m < M
    acc = tl.zeros((M_PAD, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        kmask = k < K
        x = tl.load(x_ptr + m[:, None] * K + k[None, :], mask=mmask[:, None] & kmask[None, :],
                    other=0.0).to(tl.float32)
        w = tl.load(w_ptr + n[:, None] * K + k[None, :], mask=nmask[:, None] & kmask[None, :],
                    other=0.0).to(tl.float32)
        acc += tl.sum(w[None, :, :] * x[:, None, :], axis=2)
    tl.store(y_ptr + m[:, None] * N + n[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=mmask[:, None] & nmask[None, :])


def gemv(x: torch.Tensor, w: torch.Tensor, block_n: int, block_k: int, warps: int) -> torch.Tensor:
    """``x [M, K] @ w[N, K]^T`` with the Triton kernel (both contiguous)."""
    global triton, tl, _kernel
    if _kernel is None:
        import triton as triton_mod
        import triton.language as tl_mod
        triton, tl = triton_mod, tl_mod
        _kernel = triton.jit(_gemv_kernel)
    m, k = x.shape
    n = w.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    m_pad = 1 << (m - 1).bit_length()
    _kernel[(triton.cdiv(n, block_n),)](x, w, y, n, m, K=k, M_PAD=m_pad, BLOCK_N=block_n, BLOCK_K=block_k,
                                        num_warps=warps)
    return y


def graph_us(fn, calls: int = 50, reps: int = 20) -> float:
    """Median microseconds per call of ``fn`` recorded ``calls`` times in one CUDA graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    times = []
    for _ in range(reps + 3):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / calls)
    return round(statistics.median(times[3:]), 2)


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-6))


def probe(shapes: dict[str, tuple[int, int]], rows: list[int], configs: list[tuple[int, int, int]],
          device: str, dtype: torch.dtype) -> list[dict]:
    out = []
    g = torch.Generator(device=device).manual_seed(0)
    for name, (n, k) in shapes.items():
        w = (torch.randn(n, k, device=device, generator=g) * 0.02).to(dtype)
        for m in rows:
            x = torch.randn(m, k, device=device, generator=g).to(dtype)
            ref = F.linear(x, w)
            cell: dict = {"shape": name, "n": n, "k": k, "rows": m, "weight_mb": round(n * k * 2 / 1e6, 1)}
            timed = device == "cuda"
            if timed:
                cell["cublas_us"] = graph_us(lambda: F.linear(x, w))
            cands = []
            for bn, bk, warps in configs:
                try:
                    err = rel_err(gemv(x, w, bn, bk, warps), ref)
                except Exception as exc:  # noqa: BLE001 - a config that does not compile is skipped
                    cands.append({"config": [bn, bk, warps], "error": f"{type(exc).__name__}"})
                    continue
                c = {"config": [bn, bk, warps], "rel_err": round(err, 5)}
                if err <= 1e-2 and timed:
                    c["us"] = graph_us(lambda: gemv(x, w, bn, bk, warps))
                cands.append(c)
            ok = [c for c in cands if "us" in c]
            cell["configs_checked"] = len(cands)
            cell["max_rel_err"] = max((c["rel_err"] for c in cands if "rel_err" in c), default=None)
            if ok:
                best = min(ok, key=lambda c: c["us"])
                cell["triton_best_us"], cell["triton_best_config"] = best["us"], best["config"]
                cell["cublas_over_triton"] = round(cell["cublas_us"] / best["us"], 3)
                cell["triton_tb_per_s"] = round(n * k * 2 / (best["us"] * 1e-6) / 1e12, 2)
                cell["cublas_tb_per_s"] = round(n * k * 2 / (cell["cublas_us"] * 1e-6) / 1e12, 2)
            out.append(cell)
            print(json.dumps({k2: v for k2, v in cell.items()}), flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="1,2,4,8")
    ap.add_argument("--shapes", default=",".join(SHAPES), help=f"of {', '.join(SHAPES)}")
    ap.add_argument("--smoke", action="store_true", help="CPU, Triton's interpreter, tiny shapes, no timing")
    ap.add_argument("--commit", default=default_commit())
    ap.add_argument("--out", default="out/gemv_probe")
    args = ap.parse_args(argv)
    rows = [int(r) for r in args.rows.split(",") if r]
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
        shapes, configs, device = {"small": (40, 96), "tall": (24, 300)}, [(8, 32, 1), (16, 64, 2)], "cpu"
        dtype = torch.float32
    else:
        if not torch.cuda.is_available():
            ap.error("needs a CUDA device (or --smoke)")
        bad = [s for s in args.shapes.split(",") if s not in SHAPES]
        if bad:
            ap.error(f"unknown shape(s) {', '.join(bad)}")
        shapes = {s: SHAPES[s] for s in args.shapes.split(",")}
        configs, device, dtype = CONFIGS, "cuda", torch.bfloat16
    cells = probe(shapes, rows, configs, device, dtype)
    report = {"date": utc_date(), "commit": args.commit, "card": torch.cuda.get_device_name() if device == "cuda"
              else "cpu (interpreter)", "torch": torch.__version__, "cells": cells}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gemv_probe.json").write_text(json.dumps(report, indent=1) + "\n")
    print("| shape | rows | cuBLAS us (TB/s) | best Triton us (TB/s) [BLOCK_N, BLOCK_K, warps] | cuBLAS / Triton |")
    print("|---|---|---|---|---|")
    for c in cells:
        print(f"| {c['shape']} | {c['rows']} | {c.get('cublas_us')} ({c.get('cublas_tb_per_s')}) | "
              f"{c.get('triton_best_us')} ({c.get('triton_tb_per_s')}) {c.get('triton_best_config')} | "
              f"{c.get('cublas_over_triton')} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
