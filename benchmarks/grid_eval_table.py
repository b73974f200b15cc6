"""The evaluation energy per item of a grid's variants: one markdown table, generated, not typed.

Reads ``RESULTS_DIR/eval/*/results.json`` (written by ``edge-eval eval`` inside ``edge-eval bench``) in
the order of ``RESULTS_DIR/variants.jsonl`` and prints, per variant: items x passes, the mean score,
the mean joules per evaluated item with its 95% CI, the mean output tokens and latency, the requests
in flight during the eval (``concurrency``; per-item joules are attributed under it) and the joules'
source. A variant without an eval folder is listed as missing.

    python benchmarks/grid_eval_table.py RESULTS_DIR
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def _f(value: Any, digits: int = 2) -> str:
    return "-" if value is None else f"{float(value):.{digits}f}"


def table(root: Path) -> str:
    names = [json.loads(line)["variant"] for line in (root / "variants.jsonl").read_text().splitlines()
             if line.strip()]
    lines = ["| variant | items x passes | mean score | eval J per item [95% CI] | mean output tokens | "
             "mean latency s | concurrency | source |",
             "|---|---|---|---|---|---|---|---|"]
    for name in names:
        path = root / "eval" / name / "results.json"
        if not path.exists():
            lines.append(f"| {name} | (no eval) | - | - | - | - | - | - |")
            continue
        doc = json.loads(path.read_text())
        s = doc["summary"]
        per_pass = len(s.get("per_pass") or []) or doc.get("passes", 1)
        lo, hi = s.get("joules_ci95") or (None, None)
        score = "-" if s.get("mean_score") is None else f"{s['mean_score']:.3f} ({s['score_name']})"
        lines.append(f"| {name} | {s['n_items']} x {per_pass} | {score} | "
                     f"{_f(s.get('mean_joules_per_request'))} [{_f(lo)}..{_f(hi)}] | "
                     f"{_f(s.get('mean_output_tokens'), 1)} | {_f(s.get('mean_latency_seconds'), 3)} | "
                     f"{doc.get('concurrency', 1)} | {s.get('joules_source', '-')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", help="an edge-eval bench RESULTS_DIR")
    args = ap.parse_args(argv)
    try:
        sys.stdout.write(table(Path(args.results)))
    except (OSError, KeyError, ValueError) as exc:
        print(f"grid_eval_table: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
