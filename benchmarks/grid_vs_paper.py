"""Our variant grid next to the paper's T4 numbers: one markdown table per model, generated, not typed.

Reads ``summary.csv`` of an ``edge-eval report`` (our measured grid) and the paper's 72-row table
(``tests/data/paper_variants.csv``: EDGE-EVAL, ACL 2026 Industry Track, the published CSVs) and
prints, per (task, precision) of one of our models, our score, E_req, N_break, IPW, ρ_sys, C_tax
and Q_ret beside the paper's LoRA row of the model it is compared with (family, size label).

    python benchmarks/grid_vs_paper.py REPORT_DIR/summary.csv [--family Llama --size 1B --model llama-3.2-1b]
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAPER = ROOT / "tests" / "data" / "paper_variants.csv"
TASKS = {"rag": "rag", "summarization": "summ", "chat": "chat"}
PRECISION = {"BF16": "FP16", "FP16": "FP16", "INT8": "INT8", "INT4": "INT4"}   # ours -> the paper's column


def fmt(value: str | float | None, digits: int = 3) -> str:
    if value in (None, ""):
        return "-"
    x = float(value)
    if x != x:
        return "-"
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.{digits}g}"


def paper_rows(family: str, size: str) -> dict[tuple[str, str], dict[str, str]]:
    with open(PAPER, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["family"] == family and r["size"] == size
                and r["method"] == "LoRA"]
    fp16 = {r["task"]: float(r["score"]) for r in rows if r["precision"] == "FP16"}
    out = {}
    for r in rows:
        r = dict(r)
        r["q_ret"] = str(100.0 * float(r["score"]) / fp16[r["task"]]) if r["precision"] != "FP16" else ""
        out[(r["task"], r["precision"])] = r
    return out


def table(summary: Path, family: str, size: str, model: str) -> str:
    with open(summary, newline="") as f:
        ours = [r for r in csv.DictReader(f) if r["model"] == model]
    paper = paper_rows(family, size)
    lines = ["| task | precision | score ours / paper | E_req J ours / paper | N_break ours / paper | "
             "IPW 1/J ours / paper | ρ_sys ours / paper | C_tax ours / paper | Q_ret % ours / paper |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in ours:
        p = paper.get((TASKS.get(r["task"], r["task"]), PRECISION.get(r["precision"], r["precision"])), {})

        def pair(ours_key: str, paper_key: str) -> str:
            return f"{fmt(r.get(ours_key))} / {fmt(p.get(paper_key))}"

        lines.append(f"| {r['task']} | {r['precision']} (paper {PRECISION.get(r['precision'], '?')}) | "
                     f"{pair('score', 'score')} | {pair('e_req_joules', 'energy_per_request_joules')} | "
                     f"{pair('n_break', 'n_break')} | {pair('ipw', 'ipw_per_joule')} | "
                     f"{pair('rho_sys', 'rho_sys')} | {pair('c_tax', 'c_tax')} | {pair('q_ret', 'q_ret')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("summary", help="summary.csv from edge-eval report")
    ap.add_argument("--family", default="Llama", help="the paper's family (Llama or Qwen)")
    ap.add_argument("--size", default="1B", help="the paper's size label")
    ap.add_argument("--model", default="llama-3.2-1b", help="our model column value")
    args = ap.parse_args(argv)
    try:
        sys.stdout.write(table(Path(args.summary), args.family, args.size, args.model))
    except (OSError, KeyError) as exc:
        print(f"grid_vs_paper: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
