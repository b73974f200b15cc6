"""GPU micro-benchmark: the engine's compiled elementwise ops (``engines/fast/fused.Ops``, ``torch.compile`` with
``dynamic=True``) against the same functions compiled for static shapes, at decode and prefill sizes (issue 17).

benchmarks/rope_layout.py found the dynamic rotary of a 4,096-token prefill 5-9x slower than a static compile on an
H100 (89-156 against 16.5 us). This asks the same of the other fused ops the engine's graphs hold: the residual add +
RMSNorm (32 per step), RMSNorm, and SiLU-mul, each at 64 rows (a 64-stream decode step) and 4,096 rows (the
64-prompt prefill), and the add + RMSNorm of an INT4 step's split-K partials (4 and 8: the o and down projections' at
64 rows). Device time only (calls captured in a CUDA graph, :func:`gemv_probe.graph_us`); both compiles are checked
for the same bits as the eager function. The two norms also run as the Triton kernel of ``engines/fast/norm_kernel.py``
(``MODEL_SERVER_FAST_NORM=triton``): its time, whether its ``h`` has the eager bits, and its normed row's largest
distance from the eager one in units in the last place. A third compile, ``rows_dynamic``, is the middle way the
engine serves with ``MODEL_SERVER_FAST_COMPILE_SHAPES=rows``: static, but the token-row dimensions marked dynamic
(``fused.mark_rows``; the hidden and intermediate sizes stay constants), one compile for every row count. Prints one
JSON object (and writes it to --out).

  python3 benchmarks/compiled_ops_static.py --out DIR      # exits 2 with one line without a CUDA device
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from model_server.engines.fast import fused, norm_kernel, rope_kv  # noqa: E402
from gemv_probe import graph_us  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    head, rest = __doc__.split("\n\n", 1)
    p = argparse.ArgumentParser(description=head, formatter_class=argparse.RawDescriptionHelpFormatter, epilog=rest)
    p.add_argument("--rows", default="1,64,4096", help="token rows, comma-separated")
    p.add_argument("--splits", default="4,8", help="split-K partial counts for add_parts_rms_norm ('' for none)")
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=8192)
    p.add_argument("--reps", type=int, default=20, help="calls per variant in its timed CUDA graph (>= 1)")
    p.add_argument("--out", type=Path, default=None, help="directory for compiled_ops_static.json")
    args = p.parse_args(argv)
    try:
        args.rows = [int(v) for v in args.rows.split(",") if v.strip()]
        args.splits = [int(v) for v in args.splits.split(",") if v.strip()]
    except ValueError:
        p.error("--rows and --splits take positive integers")
    if args.splits and min(args.splits) < 2:
        p.error("--splits: 2 or more partials")
    if not args.rows or min(args.rows) < 1 or args.reps < 1:
        p.error("--rows takes positive integers, --reps >= 1")
    return args


def _flat(r):
    return r if isinstance(r, tuple) else (r,)


def _ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance between two bf16 tensors in units in the last place."""
    return int((a.view(torch.int16).to(torch.int32) - b.view(torch.int16).to(torch.int32)).abs().max())


def rows_marked(name: str, a: tuple) -> tuple:
    """Copies of ``a``'s tensors with the dimensions that vary with a step marked dynamic, as the engine marks them
    with ``MODEL_SERVER_FAST_COMPILE_SHAPES=rows`` (:func:`model_server.engines.fast.fused.mark_rows`)."""
    out = tuple(t.clone() if isinstance(t, torch.Tensor) else t for t in a)
    fused.mark_rows(name, out)
    return out


def _arm(cell: dict, prefix: str, measure) -> None:
    """``cell.update(measure())`` under ``prefix``; a variant that fails (a compile error, a guard it cannot meet) is
    recorded as ``<prefix>_error`` and the others still run (one device call measures them all)."""
    try:
        cell.update(measure())
    except Exception as exc:  # noqa: BLE001 - keep the call's other numbers
        cell[f"{prefix}_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"


def _cell(name: str, a: tuple, splits: int, m: int, dyn, sta, rowdyn, kernel, reps: int) -> dict:
    """One op at one size: the dynamic, static and rows-dynamic compiles (and the Triton norm kernel where given)
    against eager."""
    eager = _flat(getattr(fused, name)(*a))
    cell: dict = {"op": name, "rows": m, "splits": splits}
    _arm(cell, "dynamic", lambda: {"same_bits_as_eager": all(torch.equal(p, q) for p, q in zip(eager, _flat(dyn(*a)))),
                                   "dynamic_us": graph_us(lambda: dyn(*a), calls=reps)})
    _arm(cell, "static", lambda: {"static_same_bits": all(torch.equal(p, q) for p, q in zip(eager, _flat(sta(*a)))),
                                  "static_us": graph_us(lambda: sta(*a), calls=reps)})
    ar = rows_marked(name, a)
    _arm(cell, "rows_dynamic", lambda: {
        "rows_dynamic_same_bits": all(torch.equal(p, q) for p, q in zip(eager, _flat(rowdyn(*ar)))),
        "rows_dynamic_us": graph_us(lambda: rowdyn(*ar), calls=reps)})
    if kernel is not None:
        def triton() -> dict:
            kh, ky = kernel(*a)
            return {"triton_us": graph_us(lambda: kernel(*a), calls=reps),
                    "triton_h_same_bits": torch.equal(kh, eager[0]), "triton_y_max_ulps": _ulps(ky, eager[1])}
        _arm(cell, "triton", triton)
    return cell


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("compiled_ops_static: no CUDA device; this benchmark needs a GPU", file=sys.stderr)
        return 2
    dev, dt = torch.device("cuda"), torch.bfloat16
    # dynamic_us: the dynamic compile (served until 2026-12-07); the rows compile and the kernel have columns
    os.environ[fused.SHAPES_SWITCH], os.environ[norm_kernel.SWITCH] = "dynamic", "compiled"
    ops = fused.Ops(True, dev, dt)
    if not ops.fused:
        print(f"compiled_ops_static: torch.compile unavailable ({ops.error})", file=sys.stderr)
        return 2
    names = ("add_rms_norm", "rms_norm", "silu_mul", "add_parts_rms_norm")
    static = {name: torch.compile(getattr(fused, name), dynamic=False, fullgraph=True) for name in names}
    rowdyn = {name: torch.compile(getattr(fused, name), dynamic=False, fullgraph=True) for name in names}
    kernels = {"add_rms_norm": norm_kernel.add_rms_norm, "add_parts_rms_norm": norm_kernel.add_parts_rms_norm} \
        if rope_kv.available(2) else {}
    w = torch.randn(args.hidden, device=dev, dtype=dt)
    res: dict = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "reps": args.reps, "cells": []}
    for m in args.rows:
        h, x = (torch.randn(m, args.hidden, device=dev, dtype=dt) for _ in range(2))
        g, u = (torch.randn(m, args.intermediate, device=dev, dtype=dt) for _ in range(2))
        calls = [("add_rms_norm", (h, x, w, 1e-5), 0), ("rms_norm", (x, w, 1e-5), 0), ("silu_mul", (g, u), 0)]
        calls += [("add_parts_rms_norm", (h, torch.randn(s, m, args.hidden, device=dev) * 2, w, 1e-5), s)
                  for s in args.splits]
        for name, a, splits in calls:
            res["cells"].append(_cell(name, a, splits, m, getattr(ops, name), static[name], rowdyn[name],
                                      kernels.get(name), args.reps))
    text = json.dumps(res, indent=1)
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "compiled_ops_static.json").write_text(text + "\n")
    ok = all(c.get("same_bits_as_eager") and c.get("static_same_bits") for c in res["cells"])
    return 0 if ok and not any(k.endswith("_error") for c in res["cells"] for k in c) else 1


if __name__ == "__main__":
    sys.exit(main())
