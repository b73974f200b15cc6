"""INT4 rounding error of a checkpoint's linears: min-max group ranges vs ``int4_quant.group_ranges``' clip search (issue 17).

For every 2-D weight of ``model.safetensors`` except the embedding: quantize it as ``--quantization int4`` does
(``int4_quant.quantize_groupwise``, group ``--group``), dequantize, and sum the squared error; report it relative to the
weights' own sum of squares, per range choice, with the seconds each quantization took on this machine (side by
side, one after the other per layer).

``python benchmarks/int4_weight_error.py MODEL_DIR [MODEL_DIR ...] --json OUT.json``: one row per directory, e.g. the
models ``benchmarks/quant_agreement.py`` trains (``DIR/model``). Weight error is not what decides a model's answers
(docs/benchmarks.md, "Greedy agreement with GPTQ"); this says how much the search changes it, and what it costs.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from support import default_commit, utc_date  # noqa: E402


def weight_error(model_dir: Path, group: int) -> dict:
    from safetensors.torch import load_file

    from model_server.int4_quant import dequantize_groupwise, quantize_groupwise

    state = load_file(str(model_dir / "model.safetensors"))
    total = 0.0
    err = {"minmax": 0.0, "search": 0.0}
    secs = {"minmax": 0.0, "search": 0.0}
    layers = 0
    for key, w in state.items():
        if w.dim() != 2 or "embed" in key or w.shape[1] % group:
            continue
        w = w.float()
        total += float((w.double() ** 2).sum())
        layers += 1
        for name in err:
            t = time.perf_counter()
            q, sz = quantize_groupwise(w, group, clip_search=name == "search")
            secs[name] += time.perf_counter() - t
            err[name] += float(((dequantize_groupwise(q, sz, group) - w).double() ** 2).sum())
        del w
    if not layers:
        raise SystemExit(f"int4_weight_error.py: no linear weight in {model_dir} fits group {group}")
    return {"model_dir": str(model_dir), "layers": layers,
            "relative_squared_error": {k: round(v / total, 6) for k, v in err.items()},
            "search_over_minmax": round(err["search"] / err["minmax"], 4),
            "quantize_seconds": {k: round(v, 3) for k, v in secs.items()}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dirs", nargs="+", help="directories holding a model.safetensors")
    ap.add_argument("--group", type=int, default=128, help="INT4 group size (default 128, as --quantization int4)")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args(argv)
    missing = [d for d in args.model_dirs if not (Path(d) / "model.safetensors").is_file()]
    if missing:
        ap.error(f"no model.safetensors in {', '.join(missing)}")
    rows = [weight_error(Path(d), args.group) for d in args.model_dirs]
    print("| model | linears | relative squared error, min-max | with the clip search | search / min-max | "
          "quantize s, min-max / search |")
    print("|---|---:|---:|---:|---:|---|")
    for r in rows:
        e, s = r["relative_squared_error"], r["quantize_seconds"]
        print(f"| {r['model_dir']} | {r['layers']} | {e['minmax']} | {e['search']} | {r['search_over_minmax']} | "
              f"{s['minmax']} / {s['search']} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"date": utc_date(), "commit": default_commit(), "group": args.group,
                                               "command": "python benchmarks/int4_weight_error.py " + " ".join(
                                                   sys.argv[1:] if argv is None else argv),
                                               "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
