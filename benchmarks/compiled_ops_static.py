"""GPU micro-benchmark: the engine's compiled elementwise ops (``engines/fast/fused.Ops``, ``torch.compile`` with
``dynamic=True``) against the same functions compiled for static shapes, at decode and prefill sizes (issue 17).

benchmarks/rope_layout.py found the dynamic rotary of a 4,096-token prefill 5-9x slower than a static compile on an
H100 (89-156 against 16.5 us). This asks the same of the other fused ops the engine's graphs hold: the residual add +
RMSNorm (32 per step), RMSNorm, and SiLU-mul, each at 64 rows (a 64-stream decode step) and 4,096 rows (the
64-prompt prefill). Device time only (calls captured in a CUDA graph, :func:`gemv_probe.graph_us`); both compiles
are checked for the same bits as the eager function. Prints one JSON object (and writes it to --out).

  python3 benchmarks/compiled_ops_static.py --out DIR      # exits 2 with one line without a CUDA device
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from model_server.engines.fast import fused  # noqa: E402
from gemv_probe import graph_us  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    head, rest = __doc__.split("\n\n", 1)
    p = argparse.ArgumentParser(description=head, formatter_class=argparse.RawDescriptionHelpFormatter, epilog=rest)
    p.add_argument("--rows", default="64,4096", help="token rows, comma-separated")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=8192)
    p.add_argument("--reps", type=int, default=20, help="calls per variant in its timed CUDA graph (>= 1)")
    p.add_argument("--out", type=Path, default=None, help="directory for compiled_ops_static.json")
    args = p.parse_args(argv)
    try:
        args.rows = [int(v) for v in args.rows.split(",") if v.strip()]
    except ValueError:
        p.error("--rows takes positive integers")
    if not args.rows or min(args.rows) < 1 or args.reps < 1:
        p.error("--rows takes positive integers, --reps >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("compiled_ops_static: no CUDA device; this benchmark needs a GPU", file=sys.stderr)
        return 2
    dev, dt = torch.device("cuda"), torch.bfloat16
    ops = fused.Ops(True, dev, dt)
    if not ops.fused:
        print(f"compiled_ops_static: torch.compile unavailable ({ops.error})", file=sys.stderr)
        return 2
    static = {name: torch.compile(getattr(fused, name), dynamic=False, fullgraph=True)
              for name in ("add_rms_norm", "rms_norm", "silu_mul")}
    w = torch.randn(args.hidden, device=dev, dtype=dt)
    res: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "reps": args.reps, "cells": []}
    for m in args.rows:
        h, x = (torch.randn(m, args.hidden, device=dev, dtype=dt) for _ in range(2))
        g, u = (torch.randn(m, args.intermediate, device=dev, dtype=dt) for _ in range(2))
        calls = {"add_rms_norm": (h, x, w, 1e-5), "rms_norm": (x, w, 1e-5), "silu_mul": (g, u)}
        for name, a in calls.items():
            eager = getattr(fused, name)(*a)
            dyn, sta = getattr(ops, name)(*a), static[name](*a)
            flat = lambda r: r if isinstance(r, tuple) else (r,)      # noqa: E731
            same = all(torch.equal(p, q) for e, o in ((eager, dyn), (eager, sta)) for p, q in zip(flat(e), flat(o)))
            cell = {"op": name, "rows": m, "same_bits_as_eager": same,
                    "dynamic_us": graph_us(lambda: getattr(ops, name)(*a), calls=args.reps),
                    "static_us": graph_us(lambda: static[name](*a), calls=args.reps)}
            res["cells"].append(cell)
    text = json.dumps(res, indent=1)
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "compiled_ops_static.json").write_text(text + "\n")
    return 0 if all(c["same_bits_as_eager"] for c in res["cells"]) else 1


if __name__ == "__main__":
    sys.exit(main())
