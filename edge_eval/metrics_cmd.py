"""``edge-eval metrics``: the five metrics and the paper's flags from a measurements CSV."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edge_eval.measurements import MODES, Prices, compute_table, read_csv, write_csv


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "metrics", help="N_break, IPW, rho_sys, C_tax, Q_ret (+ flags) from a measurements CSV",
        description=(
            "Compute the five EDGE-EVAL metrics (EDGE-EVAL, ACL 2026 Industry Track, §3) from one "
            "row of measurements per variant (columns: docs/metrics.md, 'Measurements table'). "
            "Extra columns pass through. Paper mode uses the paper's constants and nominal sizes."))
    p.add_argument("measurements", type=Path, help="measurements CSV, one row per variant")
    p.add_argument("--mode", choices=MODES, default="paper",
                   help="paper: the paper's constants (default); production: the prices below")
    p.add_argument("--out", type=Path, help="output CSV (default: standard output)")
    d = Prices()
    p.add_argument("--usd-per-kwh", type=float, default=d.usd_per_kwh, help="production: USD/kWh")
    p.add_argument("--pue", type=float, default=d.pue, help="production: power usage effectiveness")
    p.add_argument("--api-usd-per-million-input-tokens", type=float,
                   default=d.api_usd_per_million_input_tokens, help="production: API input price")
    p.add_argument("--api-usd-per-million-output-tokens", type=float,
                   default=d.api_usd_per_million_output_tokens, help="production: API output price")
    p.add_argument("--gpu-usd-per-hour", type=float, default=d.gpu_usd_per_hour,
                   help="production: GPU rental USD/hour (0: electricity only)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    prices = Prices(args.usd_per_kwh, args.pue, args.api_usd_per_million_input_tokens,
                    args.api_usd_per_million_output_tokens, args.gpu_usd_per_hour)
    header, rows = read_csv(args.measurements, args.mode)
    out_header, out_rows = compute_table(header, rows, args.mode, prices)
    text = write_csv(args.out, out_header, out_rows)
    if args.out is None:
        sys.stdout.write(text)
    else:
        print(f"wrote {len(out_rows)} rows to {args.out}", file=sys.stderr)
    return 0
