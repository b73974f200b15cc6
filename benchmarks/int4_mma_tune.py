"""Write the CUDA W4A16 kernel's measured configurations (model_server/data/int4_mma_tuned.json) from a sweep's result.

Reads int4_mma.json from ``benchmarks/int4_mma_bench.py`` (run with its sweep, on the card the table is for) and, per
cell (layer shape, rows), takes the fastest correct configuration among the sweep's rows and the cell's own columns
(the served config, the rule's FLAT and KW twins). A cell's fastest goes into the table where it beats the rule with
FLAT (``int4_mma.rule_config(..., flat=1)``, what serves shapes the table lacks) by at least --min-gain; elsewhere the
cell enters with the rule's FLAT configuration (``"rule_flat": true``), so that its steps keep it rather than take the
entry of another row count of the same 8-token tiles (a 1-row step took the 8-row winner of the down projection, 0.4
us slower than FLAT on an H100 and an H200). Entries of the same SM count, shape and rows are replaced, the rest kept.
A cell without a sweep (``--no-sweep``, or a budget that never reached it) never enters; the LM head enters like the
others when it was swept (``int4_mma_bench.py --shapes lm_head``).

  python3 benchmarks/int4_mma_tune.py benchmarks/results/DATE/mma_HHMM/mma/int4_mma.json
  python3 benchmarks/int4_mma_tune.py RESULT.json --table OUT.json --min-gain 0.05 --dry-run
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from int4_mma_bench import MAX_ERR, good_time  # noqa: E402
from int4_mma_configs import kw_twin  # noqa: E402
from model_server import int4_mma, int4_mma_tuned  # noqa: E402

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    head, rest = __doc__.split("\n\n", 1)
    p = argparse.ArgumentParser(description=head, formatter_class=argparse.RawDescriptionHelpFormatter, epilog=rest)
    p.add_argument("result", type=Path, help="int4_mma.json from int4_mma_bench.py (with its sweep)")
    p.add_argument("--table", type=Path, default=int4_mma_tuned.TABLE, help="the table to update (default: the package's)")
    p.add_argument("--min-gain", type=float, default=0.03,
                   help="enter a cell only where its best is at least this fraction faster than the rule with FLAT")
    p.add_argument("--dry-run", action="store_true", help="print the entries, write nothing")
    return p.parse_args(argv)


def candidates(cell: dict, num_sms: int) -> list[tuple[float, int4_mma.Config]]:
    """(microseconds, config) for every correct configuration the cell timed."""
    m, n, k = cell["m"], cell["n"], cell["k"]
    rule = int4_mma.rule_config(m, n, k, num_sms)
    out: list[tuple[float, int4_mma.Config]] = []
    served = cell.get("mma_config")
    for column, cfg in (("mma", int4_mma.Config(**served) if served else None), ("mma_rule", rule),
                        ("mma_flat", dataclasses.replace(rule, flat=1)), ("mma_kw", kw_twin(rule))):
        us = good_time(cell, column)
        if us is not None and cfg is not None:
            out.append((us, cfg))
    for row in cell.get("sweep", []):
        if isinstance(row.get("us"), (int, float)) and row.get("err", 1.0) < MAX_ERR:
            out.append((row["us"], int4_mma.Config(**row["config"])))
    return out


def entries(res: dict, source: str, min_gain: float) -> list[dict]:
    """The table entries a result gives (see the module docstring)."""
    num_sms = int(res["num_sms"])
    out = []
    for cell in res["cells"]:
        if not cell.get("sweep"):
            continue
        flat_us = good_time(cell, "mma_flat")
        timed = candidates(cell, num_sms)
        if flat_us is None or not timed:
            continue
        us, cfg = min(timed, key=lambda t: t[0])
        rule_flat = us > flat_us * (1.0 - min_gain) or not int4_mma.fits(cfg, cell["m"], cell["k"])
        if rule_flat:
            us, cfg = flat_us, int4_mma.rule_config(cell["m"], cell["n"], cell["k"], num_sms, flat=1)
        out.append({"num_sms": num_sms, "n": cell["n"], "k": cell["k"], "m": cell["m"], "config": vars(cfg),
                    "us": round(us, 3), "rule_flat_us": round(flat_us, 3), "device": res.get("device"),
                    "group": res.get("group"), "source": source, **({"rule_flat": True} if rule_flat else {}),
                    **({"sweep_cut": True} if cell.get("sweep_cut") else {})})
    return out


def merge(table: dict, new: list[dict]) -> dict:
    """``table`` with ``new``'s entries replacing those of the same SM count, shape and rows."""
    key = lambda e: (e["num_sms"], e["n"], e["k"], e["m"])          # noqa: E731
    fresh = {key(e) for e in new}
    kept = [e for e in table.get("configs", []) if key(e) not in fresh]
    return {**table, "configs": sorted(kept + new, key=key)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        res = json.loads(args.result.read_text())
        cells = res["cells"]
        int(res["num_sms"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"int4_mma_tune: {args.result} is not an int4_mma_bench result ({exc})", file=sys.stderr)
        return 2
    if not any(c.get("sweep") for c in cells):
        print(f"int4_mma_tune: {args.result} has no sweep (run int4_mma_bench.py without --no-sweep)", file=sys.stderr)
        return 2
    try:
        source = str(args.result.resolve().relative_to(Path(__file__).resolve().parents[1]))
    except ValueError:
        source = str(args.result)
    new = entries(res, source, args.min_gain)
    for e in new:
        c = e["config"]
        print(f"{e['n']}x{e['k']} M={e['m']}: {e['us']:.2f} us (rule with FLAT {e['rule_flat_us']:.2f}) "
              f"{int4_mma.Config(**c).name()} split {c['split']}" + (" (the rule with FLAT kept)" if e.get("rule_flat")
                                                                   else ""))
    if args.dry_run:
        return 0
    table = json.loads(args.table.read_text()) if args.table.exists() else {}
    table.setdefault("about", "The CUDA W4A16 kernel's measured launch configurations: written by "
                              "benchmarks/int4_mma_tune.py, read by model_server/int4_mma_tuned.py (its docstring).")
    merged = merge(table, new)
    args.table.write_text(json.dumps(merged, indent=1) + "\n")
    print(f"{len(new)} entries from {source}; {len(merged['configs'])} in {args.table}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
