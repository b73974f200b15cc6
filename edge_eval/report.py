"""``edge-eval report``: the paper's tables, plots and one offline HTML page from a results dir.

Writes, under ``--out``: ``n_break.csv``, ``ipw.csv``, ``rho_sys.csv``, ``c_tax.csv``,
``q_ret.csv``, ``summary.csv`` (every column), ``energy_per_token.csv`` (the concurrency sweep),
``report.md`` (markdown tables), six PNG plots and ``report.html`` (plots inlined as base64, no
external resource). Same input, same bytes: rows in the grid's order, fixed number format, fixed
plot style, no timestamps. A half-written directory is reported as far as it goes, with what is
missing, failed or unreadable listed first.
"""
from __future__ import annotations

import argparse
import base64
import html
import sys
from pathlib import Path
from typing import Callable, Mapping, Sequence

from edge_eval import report_plots
from edge_eval.errors import UsageError
from edge_eval.measurements import MODES, compute_table, fmt, validate, write_csv
from edge_eval.results_dir import ResultsDir, load

TABLES: dict[str, tuple[str, ...]] = {
    "n_break": ("variant", "size_label", "precision", "adaptation_usd", "adaptation_joules",
                "e_req_joules", "n_break", "roi_within_hour"),
    "ipw": ("variant", "size_label", "precision", "score", "score_scale", "score_ci95_low",
            "score_ci95_high", "e_req_joules", "ipw"),
    "rho_sys": ("variant", "size_label", "precision", "tokens_per_second", "model_gigabytes",
                "rho_sys"),
    "c_tax": ("variant", "precision", "batch_requests", "load_seconds", "load_energy_joules_used",
              "e_req_joules", "c_tax", "serverless_prohibitive"),
    "q_ret": ("variant", "precision", "score", "reference_score", "q_ret", "lossless"),
}
PLOTS: dict[str, tuple[str, Callable[..., bytes]]] = {
    "n_break.png": ("N_break per variant (ROI line at 20)", report_plots.n_break),
    "ipw_vs_size.png": ("IPW against model size", report_plots.ipw_vs_size),
    "rho_sys_by_precision.png": ("rho_sys per precision", report_plots.rho_by_precision),
    "c_tax.png": ("C_tax per variant (serverless line at 100)", report_plots.c_tax),
    "q_ret.png": ("Q_ret (lossless line at 99.9 %)", report_plots.q_ret),
}
SWEEP_COLUMNS = ("variant", "concurrency", "requests", "seconds", "output_tokens",
                 "energy_joules", "joules_per_output_token", "tokens_per_second")


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "report", help="paper-style CSVs, markdown, PNG plots and an offline HTML report",
        description=(
            "Turn an `edge-eval bench` results directory (or a directory holding a "
            "measurements.csv) into the paper's metric tables (EDGE-EVAL, ACL 2026 Industry "
            "Track, §5), plots and one self-contained HTML page. Same input, same bytes."))
    p.add_argument("results_dir", type=Path, help="edge-eval bench --out directory")
    p.add_argument("--out", type=Path, required=True, help="report directory (created)")
    p.add_argument("--mode", choices=MODES, default="production",
                   help="metric mode (default production; paper needs nominal size labels)")
    p.set_defaults(func=run)


def _pick(rows: Sequence[Mapping[str, str]], header: Sequence[str],
          columns: Sequence[str]) -> tuple[list[str], list[dict[str, str]]]:
    cols = [c for c in columns if c in header]
    return cols, [{c: r.get(c, "") for c in cols} for r in rows]


def _markdown(cols: Sequence[str], rows: Sequence[Mapping[str, str]]) -> str:
    if not rows:
        return "_no rows_\n"
    def esc(text: str) -> str:
        return str(text).replace("|", "\\|")

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(esc(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _html_table(cols: Sequence[str], rows: Sequence[Mapping[str, str]]) -> str:
    if not rows:
        return "<p><em>no rows</em></p>"
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(r.get(c, '')))}</td>" for c in cols)
                   + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _status_lines(res: ResultsDir, n_ok: int) -> list[str]:
    lines = [f"{n_ok} variant(s) reported."]
    lines += [f"missing (planned, no result yet): {v}" for v in res.missing]
    lines += [f"failed: {v}: {e}" for v, e in res.failed.items()]
    lines += [f"note: {n}" for n in res.notes]
    return lines


def build(results_dir: Path, out: Path, mode: str) -> list[str]:
    """Write the report; return the status lines (what is there, what is missing)."""
    if not results_dir.is_dir():
        raise UsageError(f"{results_dir}: not a directory")
    res = load(results_dir)
    good: list[dict[str, str]] = []
    for row in res.rows:
        try:
            validate([row], res.header, mode, f"variant {row.get('variant')!r}")
            good.append(row)
        except UsageError as exc:
            res.notes.append(f"skipped: {exc}")
    header, summary = (compute_table(res.header, good, mode) if good else ([], []))
    out.mkdir(parents=True, exist_ok=True)
    status = _status_lines(res, len(summary))
    md = ["# EDGE-EVAL report", "", f"Results: `{results_dir.name}`, mode: {mode}.", ""]
    md += [f"- {s}" for s in status] + [""]
    parts = [f"<h1>EDGE-EVAL report</h1><p>Results: <code>{html.escape(results_dir.name)}</code>,"
             f" mode: {mode}.</p><ul>"
             + "".join(f"<li>{html.escape(s)}</li>" for s in status) + "</ul>"]
    for name, columns in TABLES.items():
        cols, rows = _pick(summary, header, columns)
        if name == "q_ret":
            rows = [r for r in rows if r.get("q_ret")]
        write_csv(out / f"{name}.csv", cols, rows)
        md += [f"## {name}", "", _markdown(cols, rows)]
        parts.append(f"<h2>{name}</h2>" + _html_table(cols, rows))
    write_csv(out / "summary.csv", header, summary)
    sweep_rows = [{"variant": v, **{k: fmt(float(p[k])) if isinstance(p.get(k), (int, float))
                                    else "" for k in SWEEP_COLUMNS[1:]}}
                  for v, pts in res.sweeps.items() for p in pts]
    write_csv(out / "energy_per_token.csv", SWEEP_COLUMNS, sweep_rows)
    md += ["## energy per output token against concurrency", "",
           _markdown(SWEEP_COLUMNS, sweep_rows)]
    parts.append("<h2>energy per output token against concurrency</h2>"
                 + _html_table(SWEEP_COLUMNS, sweep_rows))
    plots = {k: (title, fn(summary)) for k, (title, fn) in PLOTS.items()}
    plots["energy_per_token.png"] = ("Energy per output token against concurrency",
                                     report_plots.energy_per_token(res.sweeps))
    md += ["## plots", ""]
    parts.append("<h2>plots</h2>")
    for fname, (title, png) in plots.items():
        (out / fname).write_bytes(png)
        md.append(f"![{title}]({fname})")
        b64 = base64.b64encode(png).decode("ascii")
        parts.append(f"<figure><img alt=\"{html.escape(title)}\" "
                     f"src=\"data:image/png;base64,{b64}\"><figcaption>{html.escape(title)}"
                     "</figcaption></figure>")
    (out / "report.md").write_text("\n".join(md) + "\n", encoding="utf-8")
    style = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;"
             "font-size:12px}td,th{border:1px solid #ccc;padding:2px 6px}img{max-width:100%}")
    page = ("<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>EDGE-EVAL report</title>"
            f"<style>{style}</style></head><body>" + "\n".join(parts) + "</body></html>\n")
    (out / "report.html").write_text(page, encoding="utf-8")
    return status


def run(args: argparse.Namespace) -> int:
    status = build(args.results_dir, args.out, args.mode)
    for line in status:
        print(line, file=sys.stderr)
    print(f"report written to {args.out}", file=sys.stderr)
    return 0
