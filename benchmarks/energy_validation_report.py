"""energy_validation.py's outputs: the replayable counter trace (trace.jsonl), the JSON and markdown
reports and the table it prints.

Owns: the file formats of a run's results. Must NOT: measure or judge anything.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table


def write_trace(path: Path, readings: list[Any], source: str, uuids: list[str], period: float) -> None:
    if not readings:
        return
    t0 = readings[0].t_ns
    with path.open("w") as f:
        f.write(json.dumps({"kind": "header", "source": source, "gpus": [{"uuid": u} for u in uuids],
                            "period_seconds": period, "format": "edge-proxy energy trace v1",
                            "note": "recorded by benchmarks/energy_validation.py"}) + "\n")
        for r in readings:
            rec: dict[str, Any] = {"t": round((r.t_ns - t0) / 1e9, 6), "energy_millijoules": r.energy_mj}
            if r.power_w:
                rec["power_watts"] = {u: round(p, 3) for u, p in r.power_w.items()}
            f.write(json.dumps(rec) + "\n")


def fmt(x: Any, spec: str = ".4g") -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return format(x, spec)
    return str(x)


CHECK_TITLES = {"1_mixed_load_conservation": ("1 mixed load: attributed+idle vs counter", "< 0.5 %"),
                "2_isolated_requests": ("2 isolated requests: full vs own-window counter", "< 10 %"),
                "3_identical_concurrent": ("3 16 identical concurrent: max deviation from mean", "< 10 %"),
                "4_two_x_tokens": ("4 2x output tokens: full-energy ratio", "1.6x-2.4x"),
                "4b_two_x_tokens_under_load": ("4b 2x output tokens inside a steady load", "1.6x-2.4x"),
                "5_sampler_overhead": ("5 sampler overhead: decode ITL on/off", "< 2 %")}


def summary_rows(out: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    c = dict(out["checks"])
    rows = []
    for key, (title, crit) in CHECK_TITLES.items():
        if key in c and "error" in c[key] and len(c[key]) <= 2:
            rows.append((title, f"did not run: {c.pop(key)['error']}", crit, "FAIL"))
    if "1_mixed_load_conservation" in c:
        x = c["1_mixed_load_conservation"]
        rows.append(("1 mixed load: attributed+idle vs counter", f"{fmt(x.get('ledger_delta_j'), '.1f')} J vs "
                     f"{fmt(x.get('counter_delta_j'), '.1f')} J, error {fmt(100 * x['relative_error'] if x.get('relative_error') is not None else None, '.3f')} %",
                     "< 0.5 %", "PASS" if x["pass"] else "FAIL"))
    if "2_isolated_requests" in c:
        x = c["2_isolated_requests"]
        me = x.get("max_relative_error")
        rows.append(("2 isolated requests: full vs own-window counter",
                     f"max error {fmt(100 * me if me is not None else None, '.2f')} % over {len(x['requests'])} "
                     f"(>= {fmt(x.get('min_duration_s'), '.2f')} s each)", "< 10 %", "PASS" if x["pass"] else "FAIL"))
    if "3_identical_concurrent" in c:
        x = c["3_identical_concurrent"]
        d = x.get("max_relative_deviation")
        rows.append(("3 16 identical concurrent: max deviation from mean",
                     f"{fmt(100 * d if d is not None else None, '.2f')} % (mean {fmt(x.get('mean_full_j'), '.2f')} J)",
                     "< 10 %", "PASS" if x["pass"] else "FAIL"))
    if "4_two_x_tokens" in c:
        x = c["4_two_x_tokens"]
        rows.append(("4 2x output tokens: full-energy ratio",
                     f"{fmt(x.get('ratio_full'), '.2f')}x (counter implies {fmt(x.get('ratio_implied_by_counter'), '.2f')}x)",
                     "1.6x-2.4x", "PASS" if x["pass"] else "FAIL"))
    if "4b_two_x_tokens_under_load" in c:
        x = c["4b_two_x_tokens_under_load"]
        rows.append((f"4b 2x output tokens inside {x.get('background_streams')} background streams: full-energy ratio",
                     f"{fmt(x.get('ratio_full'), '.2f')}x (active {fmt(x.get('ratio_active'), '.2f')}x)",
                     "1.6x-2.4x", "PASS" if x["pass"] else "FAIL"))
    if "5_sampler_overhead" in c:
        x = c["5_sampler_overhead"]
        w = x.get("worst_relative_difference")
        rows.append(("5 sampler overhead: decode ITL on/off",
                     f"median ITL {fmt(x.get('itl_off_median_s', 0) * 1e3, '.3f')} ms off, "
                     f"{fmt(x.get('itl_on_median_s', 0) * 1e3, '.3f')} ms on; worst diff {fmt(100 * w if w is not None else None, '.2f')} %",
                     "< 2 %", "PASS" if x["pass"] else "FAIL"))
    return rows


def write_reports(out: dict[str, Any], out_dir: Path) -> None:
    (out_dir / "energy_validation.json").write_text(json.dumps(out, indent=2, default=str))
    rows = summary_rows(out)
    md = [f"# Energy validation ({out['preset']}, {out['device']}, source {out['source']})", "",
          f"- date (UTC): {out['date']}", f"- device: {out.get('device_name', '-')}",
          f"- command: `{out['command']}`", f"- energy source: {out.get('energy_source', '-')}",
          f"- learned idle power: {fmt(out.get('idle_watts_learned'), '.1f')} W", "",
          "| check | measured | criterion | result |", "|---|---|---|---|"]
    md += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    c4 = out["checks"].get("4_two_x_tokens", {})
    if c4.get("ratio_implied_by_counter") is not None:
        md += ["", "Check 4 note: per-tick apportioning charges the long request all of the energy of the "
               "time it runs alone; the counter itself implies a ratio of "
               f"{c4['ratio_implied_by_counter']:.2f}x (1 + 2 E_solo / E_shared)."]
    (out_dir / "energy_validation.md").write_text("\n".join(md) + "\n")
    table = Table(title="energy validation")
    for col in ("check", "measured", "criterion", "result"):
        table.add_column(col)
    for r in rows:
        table.add_row(*r)
    Console().print(table)
