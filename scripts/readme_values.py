"""The values of the README's "Measured" table: one function per row kind, raw result files -> the cell.

Owns turning loaded result files (JSON documents or markdown text, as :mod:`readme_table` loads them)
into the value cell's text. Must not read files, know the README or pick which files a row reads
(scripts/readme_table.py does).
"""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]

def pct(x: float, digits: int = 3) -> str:
    return f"{100 * x:.{digits}f} %"


def span(values: list[float], fmt: Callable[[float], str]) -> str:
    lo, hi = min(values), max(values)
    return fmt(lo) if len(values) == 1 or fmt(lo) == fmt(hi) else f"{fmt(lo)} - {fmt(hi)}"


def check(key: str, field: str, digits: int = 3) -> Callable[[list[Any]], str]:
    def value(docs: list[Any]) -> str:
        vals = [d["checks"][key][field] for d in docs]
        fails = sum(1 for d in docs if not d["checks"][key]["pass"])
        runs = f" ({len(docs)} runs)" if len(docs) > 1 else ""
        verdict = f"; fails its check in {fails} of {len(docs)}" if fails else ""
        return span(vals, lambda v: pct(v, digits)) + runs + verdict
    return value


def engine_tok_s(docs: list[Any]) -> str:
    for line in docs[0].splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[:4] == ["fast", "bf16", "64", "64"]:
            return f"{float(cells[4]):,.0f} tokens/s (bf16, prompt 64; NF4 has no raw file of a rerun)"
    raise ValueError("engine_throughput: no fast/bf16/64/64 row")


def levels(doc: dict, quant: str, conc: int) -> dict:
    v = next(v for v in doc["variants"] if v["quantization"] == quant)
    return next(x for x in v["levels"] if x["concurrency"] == conc)


def http_vs_sequential(docs: list[Any]) -> str:
    d = docs[0]
    return " / ".join(f"{levels(d, q, 32)['ratio_vs_sequential']:.0f}x ({q})" for q in ("fp16", "nf4"))


def rho_sys(docs: list[Any]) -> str:
    return (f"{levels(docs[0], 'nf4', 64)['rho_sys']:,.0f} tokens/s/GB "
            f"(paper, T4 + vLLM: {docs[0]['paper_rho_sys_tokens_per_s_per_gb']:,.0f})")


def cold(docs: list[Any]) -> str:
    s = {x["variant"]: x for x in docs[0]["summary"]}
    f, n = s["fp16"], s["nf4"]
    return (f"{f['cold_start_seconds']:.1f} s / {n['cold_start_seconds']:.1f} s; C_tax "
            f"{f['c_tax_energy']:,.0f}x / {n['c_tax_energy']:,.0f}x a request; keep-warm break-even idle "
            f"{f['keep_warm_break_even_idle_seconds']:.0f} s / {n['keep_warm_break_even_idle_seconds']:.0f} s")


def proxy_ttft(docs: list[Any]) -> str:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from support import pct             # the benchmarks' one percentile (benchmarks/support.py)

    cells = {(r["target"], r["stream"], r["concurrency"]): r for r in docs[0]}
    added = [1e3 * (pct(cells[("edge-proxy", True, c)]["ttft"], 0.5) - pct(cells[("direct", True, c)]["ttft"], 0.5))
             for c in (1, 16, 64)]
    return " / ".join(f"{a:.2f}" for a in added) + " ms"


def steady(docs: list[Any]) -> str:
    """In-process tokens/s at 64 concurrent, median of the steady-state windows, per format."""
    out = []
    for q in docs[0]["quants"]:
        cell = next(c for c in q["cells"] if c["concurrency"] == 64)
        out.append(f"{q['quant']} {cell['tokens_per_second_median']:,.0f}")
    return " / ".join(out) + " tokens/s (median of 3 x 10 s windows)"


def steady_rho(docs: list[Any]) -> str:
    out = []
    for q in docs[0]["quants"]:
        cell = next(c for c in q["cells"] if c["concurrency"] == 64)
        out.append(f"{q['quant']} {cell['rho_sys_tokens_per_s_per_gb']:,.0f}")
    return " / ".join(out) + " tokens/s/GB (paper, T4 + vLLM: 6,930)"


def int4_vs_bf16(docs: list[Any]) -> str:
    """INT4 tokens/s over bf16's at each concurrency of one steady-state run."""
    by = {q["quant"]: {c["concurrency"]: c["tokens_per_second_median"] for c in q["cells"]} for q in docs[0]["quants"]}
    parts = [f"c={c}: {by['int4'][c] / by['bf16'][c]:.2f}x" for c in sorted(by["bf16"]) if c in by["int4"]]
    return "int4 / bf16 tokens/s " + ", ".join(parts) + " (median of 3 x 10 s windows each)"


def rho_max(docs: list[Any]) -> str:
    """The highest ρ_sys cell of each format in one steady-state run, with its weight bytes."""
    out = []
    for q in docs[0]["quants"]:
        cell = max(q["cells"], key=lambda c: c["rho_sys_tokens_per_s_per_gb"])
        out.append(f"{q['quant']} {cell['rho_sys_tokens_per_s_per_gb']:,.0f} at c={cell['concurrency']} "
                   f"({q['weight_bytes'] / 1e9:.2f} GB)")
    return " / ".join(out) + " tokens/s/GB (paper, T4 + vLLM: 6,930)"


def http_ratio(docs: list[Any]) -> str:
    """HTTP tokens/s over in-process at each concurrency, per --api-workers value (one run)."""
    cells = docs[0]["quants"][0]["http"]
    out = []
    for w in sorted({c["api_workers"] for c in cells}):
        parts = [f"{c['ratio_to_in_process'] * 100:.1f} % at {c['concurrency']}"
                 for c in sorted(cells, key=lambda c: c["concurrency"]) if c["api_workers"] == w]
        out.append(f"{w} workers: " + ", ".join(parts))
    return "HTTP / in-process tokens/s, " + "; ".join(out)


def decode_itl(docs: list[Any]) -> str:
    """ITL at concurrency 1 with merged projections off -> on, per format (one run)."""
    rows = docs[0]["rows"]
    out = []
    for q in dict.fromkeys(r["quant"] for r in rows):
        off, on = (next(r for r in rows if r["quant"] == q and r["merge_projections"] is m) for m in (False, True))
        out.append(f"{q} {off['itl_c1_ms']:.3f} -> {on['itl_c1_ms']:.3f}")
    return " / ".join(out) + " ms (merged q/k/v and gate/up off -> on)"


def decode_itl_ab(docs: list[Any]) -> str:
    """ITL at concurrency 1 and decode graph kernels per step, first variant -> second, per format (one run)."""
    rows = docs[0]["rows"]
    out = []
    for q in dict.fromkeys(r["quant"] for r in rows):
        a, b = [r for r in rows if r["quant"] == q][:2]
        out.append(f"{q} {a['itl_c1_ms']:.3f} -> {b['itl_c1_ms']:.3f} ms "
                   f"({a['graph_profile_b1']['kernels_per_step']:.0f} -> {b['graph_profile_b1']['kernels_per_step']:.0f} kernels)")
    return " / ".join(out) + f" ({rows[0]['variant']} -> {rows[1]['variant']})"


def steady_cells(docs: list[Any]) -> str:
    """Every in-process cell of the first format: tokens/s, ITL p50 and the share of the bandwidth limit."""
    q = docs[0]["quants"][0]
    return q["quant"] + ": " + ", ".join(
        f"c={c['concurrency']} {c['tokens_per_second_median']:,.0f} tokens/s (ITL p50 {c['itl_p50_ms']:.3f} ms, "
        f"{c['tokens_per_second_median'] / c['bandwidth_limit_tokens_per_second'] * 100:.1f} % of the bandwidth limit)"
        for c in q["cells"])


def ept(docs: list[Any]) -> str:
    """The ledger's J per output token (median of the cells) at 1 and 64 streams, per format."""
    cells = [c for d in docs for c in d["cells"]]
    quants = list(dict.fromkeys(c["quantization"] for c in cells))

    def med(q: str, conc: int) -> float:
        return statistics.median(c["ledger_full_j_per_token"] for c in cells
                                 if c["quantization"] == q and c["concurrency"] == conc)
    return ("J/token at 1 / 64 streams: " + ", ".join(f"{q} {med(q, 1):.3f} / {med(q, 64):.4f}" for q in quants)
            + f"; conservation within {max(abs(c['conservation_error']) for c in cells):.0e}")


def load_x2(docs: list[Any]) -> str:
    s = {x["source"]: x for x in docs[0]["summaries"]}
    none, one, two = s["none"], s["replay"], s["replay-x2"]

    def lags(x: dict) -> str:
        return f"{100 * x['loop_lag_over_50ms'] / x['loop_lag_runs']:.1f} %"
    return (f"req/s vs one `none` process: {one['requests_per_second'] / none['requests_per_second']:.3f} (one "
            f"process) / {two['requests_per_second'] / none['requests_per_second']:.3f} (two); loop lags > 50 ms "
            f"{lags(one)} / {lags(two)}")


def load_x4(docs: list[Any]) -> str:
    s = {x["source"]: x for x in docs[0]["summaries"]}
    none, four = s["none"], s["replay-x4"]
    return (f"req/s {four['requests_per_second'] / none['requests_per_second']:.3f}x and p99 "
            f"{four['stream_p99_seconds'] / none['stream_p99_seconds']:.2f}x one `none` process; loop lags > 50 ms "
            f"{four['loop_lag_over_50ms']:.0f} of {four['loop_lag_runs']:.0f}, GC pauses > 50 ms {four['gc_over_50ms']:.0f}")


def cold_phases(docs: list[Any]) -> str:
    runs = {r["variant"]: r for r in docs[0]["runs"] if r.get("quantization") == "bf16"}
    before = runs.get("before")
    best = min((r for r in runs.values() if r is not before), key=lambda r: r["spawn_to_first_token_s"])
    return (f"{before['spawn_to_first_token_s']:.1f} s before, {best['spawn_to_first_token_s']:.1f} s "
            f"(best variant: {best['variant']})")


def ctax(docs: list[Any]) -> str:
    """cold_start.py's C_tax and keep-warm break-even per variant, to the first token and to the engine warm."""
    def one(x: dict) -> str:
        return (f"{x['variant']} {x['c_tax_energy']:,.0f}x a request, break-even {x['keep_warm_break_even_idle_seconds']:.1f} s "
                f"(to engine warm: {x['c_tax_energy_to_engine_warm']:,.0f}x, {x['keep_warm_break_even_to_engine_warm_idle_seconds']:.1f} s)")
    return "C_tax " + "; ".join(one(x) for x in docs[0]["summary"])


def cold_log(docs: list[Any]) -> str:
    """Spawn to first token per variant from cold_start_phases.py's log (one JSON line per variant)."""
    runs = [json.loads(line) for line in docs[0].splitlines() if line.startswith("{")]
    return ", ".join(f"{r['variant']} {r['spawn_to_first_token_s']:.1f} s" for r in runs
                     if not r["variant"].startswith("fill-cache"))


def cold_paths(docs: list[Any]) -> str:
    """Spawn to first token per variant and load path (cold_start_phases.py's JSON; fill-cache runs left out)."""
    return ", ".join(f"{r['variant']} ({r['quantization']}, {r['load_path']}) {r['spawn_to_first_token_s']:.1f} s"
                     for r in docs[0]["runs"] if not r["variant"].startswith("fill-cache"))


def http_ratio_runs(docs: list[Any]) -> str:
    """HTTP / in-process tokens/s at each run's first HTTP cell, one value per file (separate runs), and their median."""
    vals = [d["quants"][0]["http"][0]["ratio_to_in_process"] * 100 for d in docs]
    c = docs[0]["quants"][0]["http"][0]["concurrency"]
    return (f"HTTP / in-process tokens/s at {c}, {len(vals)} runs: " + ", ".join(f"{v:.1f} %" for v in vals)
            + f" (median {statistics.median(vals):.1f} %)")


def tokens_by_concurrency(doc: dict) -> dict[str, dict[int, float]]:
    """A steady-state run's median tokens/s per quantization and concurrency (an entry that only records a later error
    of the same quantization, e.g. its graph-step timing failing after the cells, adds no cells)."""
    return {q["quant"]: {c["concurrency"]: c["tokens_per_second_median"] for c in q["cells"]}
            for q in doc["quants"] if "cells" in q}


def formats_vs_bf16(docs: list[Any]) -> str:
    """Each format's tokens/s over bf16's at each concurrency of one steady-state run."""
    by = tokens_by_concurrency(docs[0])
    out = [f"{q} " + ", ".join(f"{cells[c] / by['bf16'][c]:.2f}x at {c}" for c in sorted(cells) if c in by["bf16"])
           for q, cells in by.items() if q != "bf16"]
    return "tokens/s over bf16's: " + "; ".join(out) + " (median of 3 x 10 s windows each)"


def graph_agreement(docs: list[Any]) -> str:
    """prefill_graph_agree.py's JSON: per format and later prefill-graph cap, requests whose greedy tokens differ from
    the first cap's, and from the same engine's second round."""
    d = docs[0]
    first = d["caps"][0]
    return f"requests (of {d['streams']}) differing from cap {first:,}: " + "; ".join(
        f"{q} " + ", ".join(f"cap {int(c):,}: {v['vs_first_cap_differ']} (rounds: {v['rounds_differ']})"
                            for c, v in r["compare"].items() if int(c) != first) for q, r in d["quants"].items())


def formats_vs_next_bf16(docs: list[Any]) -> str:
    """Each format's tokens/s in the first file over bf16's in the second (the next process on the same machine), per
    concurrency."""
    by, bf16 = tokens_by_concurrency(docs[0]), tokens_by_concurrency(docs[1])["bf16"]
    out = [f"{q} " + ", ".join(f"{cells[c] / bf16[c]:.2f}x at {c}" for c in sorted(cells) if c in bf16)
           for q, cells in by.items() if q != "bf16"]
    return "tokens/s over bf16's (next process): " + "; ".join(out) + " (median of 3 x 10 s windows each)"


def configs_vs_rule(docs: list[Any]) -> str:
    """int4:mma with the measured configurations (first file, with bf16) and with the rule's (second file, the next
    process on the same machine): each over bf16's tokens/s, and measured over rule, per concurrency."""
    first = tokens_by_concurrency(docs[0])
    bf16, tuned, rule = first["bf16"], first["int4:mma"], tokens_by_concurrency(docs[1])["int4:mma"]
    conc = sorted(c for c in tuned if c in bf16 and c in rule)
    return ("tokens/s over bf16's: measured configurations " + ", ".join(f"{tuned[c] / bf16[c]:.2f}x at {c}" for c in conc)
            + "; the rule's (next process) " + ", ".join(f"{rule[c] / bf16[c]:.2f}x at {c}" for c in conc)
            + "; measured over rule " + ", ".join(f"{100 * (tuned[c] / rule[c] - 1):+.1f} % at {c}" for c in conc)
            + " (median of 3 x 10 s windows each)")


def gain_over_second(docs: list[Any]) -> str:
    """Each format's tokens/s in the first file over the same format's in the second (the next process on the same
    machine, one setting changed), per concurrency."""
    a, b = tokens_by_concurrency(docs[0]), tokens_by_concurrency(docs[1])
    out = [f"{q} " + ", ".join(f"{100 * (cells[c] / b[q][c] - 1):+.1f} % at {c}" for c in sorted(cells) if c in b[q])
           for q, cells in a.items() if q in b]
    return "tokens/s, first over second: " + "; ".join(out) + " (median of 3 x 10 s windows each)"


def first_request(docs: list[Any]) -> str:
    """The first request's seconds per start (cold_start_phases.py's JSON, one start per variant)."""
    return "first request: " + ", ".join(f"{r['variant']} {r['first_request_s']:.2f} s" for r in docs[0]["runs"])


def _spawn_by(docs: list[Any], key: str) -> str:
    """Spawn -> first token of every start in cold_start_phases.py's JSONs, grouped by a run's ``key``, in run order."""
    by: dict[str, list[float]] = {}
    for d in docs:
        for r in d["runs"]:
            by.setdefault(r[key], []).append(r["spawn_to_first_token_s"])
    return "; ".join(f"{k} " + ", ".join(f"{v:.2f}" for v in vals) + " s" for k, vals in by.items())


def spawn_by_variant(docs: list[Any]) -> str:
    """Spawn -> first token per variant."""
    return _spawn_by(docs, "variant")


def import_torch(docs: list[Any]) -> str:
    """``import torch`` in fresh interpreters, as installed vs from a bytecode cache (import_torch.py's JSON)."""
    d = docs[0]
    bare = statistics.median(d["bare"])
    return (f"import torch: as installed {statistics.median(d['default']) - bare:.2f} s, from a bytecode cache "
            f"{statistics.median(d['prefix']) - bare:.2f} s (medians of {len(d['default'])}; the install ships "
            f"{d['facts']['pyc_cached']:,} of {d['facts']['py_files']:,} .pyc)")


def spawn_by_quant(docs: list[Any]) -> str:
    """Spawn -> first token of every start in the files, per quantization."""
    return _spawn_by(docs, "quantization") + " (one start each)"
