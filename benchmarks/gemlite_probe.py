"""GPU micro-benchmark: GemLite's A16W4 kernels (a maintained Triton library) against our INT4 Triton GEMM and bf16
cuBLAS on llama-3.2-1b's merged shapes, the same weights, at decode row counts (issue 17: INT4 at 64 streams).

At 64 rows our INT4 linears take 830 of a 1,210 us decode step on an H100 and are bound by their own pipeline, not by
their bytes (docs/benchmarks.md, "What bounds the kernel at 64 rows"); every configuration of our kernels has been
swept. This asks whether a library's kernels do better on the same weights before writing another: per shape and
row count, device time per call (calls captured back to back in a CUDA graph, rotating over enough weight copies that
they come from HBM: ``int4_kernels.time_calls``; eager time too, which also counts launch overhead), the relative
error against ``x @ dequant(q).T`` in float32, and per row count a whole step's linears (16 layers of q/k/v, o,
gate/up, down, plus the LM head) per method. Our ``triton`` is the served kernel above 16 rows (the CUDA mma kernel
serves 1-16: its numbers are ``int4_mma_bench.py``'s). Writes gemlite_probe.json / .md to --out.

  python3 benchmarks/gemlite_probe.py --ms 16,32,64 --out DIR     # exits 2 with one line without CUDA or GemLite
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from int4_gemlite import layers, why_not  # noqa: E402
from int4_kernels import LM_HEAD, MERGED, N_LAYERS, Shape, rel_err, time_calls  # noqa: E402

METHODS = ("bf16", "triton", "gemlite")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    head, rest = __doc__.split("\n\n", 1)
    p = argparse.ArgumentParser(description=head, formatter_class=argparse.RawDescriptionHelpFormatter, epilog=rest)
    p.add_argument("--ms", default="1,8,16,32,64", help="rows M (comma-separated)")
    p.add_argument("--group", type=int, default=128, choices=(64, 128))
    p.add_argument("--reps", type=int, default=30, help="timed repeats per cell (>= 1)")
    p.add_argument("--l2-multiple", type=float, default=4.0, help="weight copies per method cover this x L2")
    p.add_argument("--no-lm-head", action="store_true")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    try:
        args.ms = [int(v) for v in args.ms.split(",") if v.strip()]
    except ValueError:
        p.error("--ms takes positive integers")
    if not args.ms or min(args.ms) < 1 or args.reps < 1:
        p.error("--ms takes positive integers, --reps >= 1")
    return args


def _cell(calls: list, reps: int) -> dict:
    """Eager and graph us per call; an error (a capture GemLite's launch does not allow, say) is kept as text."""
    try:
        eager, graph = time_calls(calls, reps)
        return {"eager_us": round(eager, 2) if eager is not None else None, "graph_us": round(graph, 2)}
    except Exception as exc:  # noqa: BLE001 - keep the other methods' numbers
        return {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}


def measure(args: argparse.Namespace) -> dict:
    props = torch.cuda.get_device_properties(0)
    l2 = int(getattr(props, "L2_cache_size", 50 << 20))
    shapes = dict(MERGED)
    if not args.no_lm_head:
        shapes["lm_head"] = LM_HEAD
    cells: list[dict] = []
    t0 = time.time()
    for name, (n, k) in shapes.items():
        sh = Shape(n, k, args.group, l2, args.l2_multiple, ["bf16", "triton"])
        ours = sh.copies["triton"][0]
        nbytes = sum(t.numel() * t.element_size() for t in ours)
        gl = layers(sh.q, sh.sz, args.group, min(256, max(1, math.ceil(args.l2_multiple * l2 / nbytes))))
        for m in args.ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = sh.reference(x)
            for method in METHODS:
                cell: dict = {"shape": name, "n": n, "k": k, "m": m, "method": method}
                try:
                    calls = [lambda lin=c[0]: lin(x) for c in gl] if method == "gemlite" else sh.calls(method, x)
                    cell["rel_err"] = rel_err(calls[0](), ref)              # (GemLite autotunes here, not timed)
                    cell["copies"] = len(calls)
                    cell.update(_cell(calls, args.reps))
                except Exception as exc:  # noqa: BLE001
                    cell["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                cells.append(cell)
            row = {c["method"]: c for c in cells[-len(METHODS):]}
            print(f"[{time.time() - t0:6.1f}s] {name} M={m} " + "  ".join(
                f"{mm} {row[mm].get('graph_us', row[mm].get('error', '?'))} us "
                f"err {row[mm].get('rel_err', float('nan')):.1e}" for mm in METHODS), flush=True)
        del sh, gl
        torch.cuda.empty_cache()
    return {"device": props.name, "torch": torch.__version__, "group": args.group, "reps": args.reps, "ms": args.ms,
            "cells": cells, "steps": steps(cells, args.ms, shapes), "seconds": round(time.time() - t0, 1)}


def steps(cells: list[dict], ms: list[int], shapes: dict) -> dict:
    """Per M and method: one decode step's linears, us (graph times; None where a cell has none)."""
    by = {(c["shape"], c["m"], c["method"]): c.get("graph_us") for c in cells}
    out: dict = {}
    for m in ms:
        for method in METHODS:
            parts = [by.get((s, m, method)) for s in shapes]
            if any(p is None for p in parts):
                out[f"{m}/{method}"] = None
                continue
            layer = sum(by[(s, m, method)] for s in MERGED)
            out[f"{m}/{method}"] = round(N_LAYERS * layer + (by.get(("lm_head", m, method)) or 0.0), 1)
    return out


def markdown(res: dict) -> str:
    lines = [f"GemLite vs ours vs bf16 on {res['device']} (torch {res['torch']}, group {res['group']}): graph us per "
             "call (relative error)", "", "| shape | M | bf16 | ours (triton) | gemlite | gemlite / ours |",
             "|---|---:|---:|---:|---:|---:|"]
    by = {(c["shape"], c["m"], c["method"]): c for c in res["cells"]}

    def fmt(d: dict) -> str:
        return f"{d['graph_us']:.1f} ({d.get('rel_err', float('nan')):.0e})" if d.get("graph_us") else "error"
    for (shape, m, method), c in by.items():
        if method != "bf16":
            continue
        o, g = by.get((shape, m, "triton"), {}), by.get((shape, m, "gemlite"), {})
        ratio = f"{g['graph_us'] / o['graph_us']:.2f}" if g.get("graph_us") and o.get("graph_us") else "-"
        lines.append(f"| {shape} | {m} | {fmt(c)} | {fmt(o)} | {fmt(g)} | {ratio} |")
    lines += ["", "| M | step linears: bf16 | ours | gemlite |", "|---:|---:|---:|---:|"]
    for m in res["ms"]:
        lines.append(f"| {m} | " + " | ".join(str(res["steps"].get(f"{m}/{mm}")) for mm in METHODS) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("gemlite_probe: no CUDA device; this benchmark needs a GPU", file=sys.stderr)
        return 2
    why = why_not()
    if why is not None:
        print(f"gemlite_probe: GemLite does not import here ({why}); carry its wheel (scripts/gpu_wheels.sh)",
              file=sys.stderr)
        return 2
    res = measure(args)
    md = markdown(res)
    print(md)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gemlite_probe.json").write_text(json.dumps(res, indent=1) + "\n")
        (args.out / "gemlite_probe.md").write_text(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
