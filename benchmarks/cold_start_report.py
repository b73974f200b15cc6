"""cold_start.py's summary and report: per variant, the medians over its cold starts, C_tax (energy,
time, the paper's form N t_load / t_batch), keep-warm break-even idle time, next to the paper's T4
figures; the markdown it writes.

Owns: turning raw cold-start records into the summary and cold_start.md. Must NOT: measure anything.
"""
from __future__ import annotations

import math
import statistics
from typing import Any

from edge_proxy.coldstart.phases import SEGMENTS
from edge_proxy.economics.formulas import cold_start_tax, cold_start_time_ratio, keep_warm_break_even_seconds

PHASE_LABELS: tuple[str, ...] = tuple(seg[0] for seg in SEGMENTS)     # the duration histogram's phase labels

# EDGE-EVAL's published C_tax (Abdullah4152/EDGE-EVAL results/c_tax): Llama 1B rows (T4, vLLM 0.6.3,
# N = 100), per task.
PAPER_T4_LLAMA_1B = {
    "fp16": {"rag": 141, "summ": 105, "chat": 280},
    "nf4": {"rag": 150, "summ": 122, "chat": 291},   # the paper's INT4 (bitsandbytes NF4)
}
PAPER_NOTE = "paper (T4, vLLM, N=100): all 72 variants > 100; 1B mean 183, range 103-375"


def _median(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return statistics.median(xs) if xs else None


def _finite(x: float | None) -> float | None:
    return None if x is None or math.isnan(x) or math.isinf(x) else x


def summarise(v: dict[str, Any], batch: int) -> dict[str, Any]:
    cs = v["cold_starts"]
    idle_w = _median([i["watts"] for i in v["idle"] if i["watts"] is not None])
    phases = {p: _median([c["phases_seconds"].get(p) for c in cs if c["phases_seconds"].get(p) is not None])
              for p in PHASE_LABELS}
    e_cold = _median([c["energy_joules"] for c in cs if c["energy_joules"] is not None])
    load_j = _median([c["load_energy_joules"] for c in cs if c["load_energy_joules"] is not None])
    e_req = _median([c["mean_request_joules"] for c in cs if c.get("mean_request_joules")])
    t_req = _median([c["mean_request_seconds"] for c in cs if c.get("mean_request_seconds")])
    t_cold = _median([c["seconds"] for c in cs if c["seconds"] is not None])
    t_warm = _median([c.get("hold_to_engine_warm_seconds") for c in cs])
    e_warm = _median([c.get("energy_to_engine_warm_joules") for c in cs])
    t_load = _median([c["model_load_to_ready_seconds"] for c in cs if c["model_load_to_ready_seconds"]])
    t_batch = _median([w["batch_seconds"] / w["requests"] * batch for w in v["warm"]])   # per N=batch
    e_batch_req = _median([w["batch_joules"] / w["requests"] for w in v["warm"] if w["batch_joules"]])
    s: dict[str, Any] = {
        "variant": v["variant"], "energy_source": v["energy_source"], "cold_starts": len(cs),
        "phases_seconds": phases, "cold_start_seconds": t_cold, "cold_start_joules": e_cold,
        "model_server_load_joules": load_j, "mean_request_joules": e_req,
        "mean_request_seconds": t_req, "batch_amortised_request_joules": e_batch_req,
        "idle_watts": idle_w, "model_load_to_ready_seconds": t_load,
        "cold_start_to_engine_warm_seconds": t_warm, "cold_start_to_engine_warm_joules": e_warm,
    }
    s["c_tax_energy"] = _finite(cold_start_tax(e_cold, e_req)) if e_cold is not None and e_req else None
    s["c_tax_energy_batch_amortised"] = (_finite(cold_start_tax(e_cold, e_batch_req))
                                         if e_cold is not None and e_batch_req else None)
    s["c_tax_time"] = _finite(cold_start_time_ratio(t_cold, t_req)) if t_cold and t_req else None
    # the paper's form: N * t_load / t_batch (power cancels)
    s["c_tax_paper_form"] = (_finite(batch * t_load / t_batch) if t_load and t_batch else None)
    s["keep_warm_break_even_idle_seconds"] = (_finite(keep_warm_break_even_seconds(e_cold, idle_w))
                                              if e_cold is not None and idle_w else None)
    s["c_tax_energy_to_engine_warm"] = (_finite(cold_start_tax(e_warm, e_req))
                                        if e_warm is not None and e_req else None)
    s["keep_warm_break_even_to_engine_warm_idle_seconds"] = (
        _finite(keep_warm_break_even_seconds(e_warm, idle_w)) if e_warm is not None and idle_w else None)
    paper = PAPER_T4_LLAMA_1B.get(v["variant"])
    s["paper_t4_llama_1b_c_tax"] = paper
    s["paper_t4_llama_1b_c_tax_mean"] = round(statistics.mean(paper.values()), 1) if paper else None
    return s


def _fmt(x: Any, nd: int = 1) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def markdown(result: dict[str, Any]) -> str:
    rows = result["summary"]
    lines = [f"# Cold start: {result['preset']} on {result['device_name']}", "",
             f"Date {result['date']}; command `{result['command']}`; batch N = {result['batch']}, "
             f"{result['max_tokens']} output tokens per request; energy source: "
             f"{', '.join(sorted({r['energy_source'] for r in rows}))}. Medians over "
             f"{result['cold_starts']} cold start(s) per variant; weights in the page cache (synthesised "
             "just before), so disk reads are not in these numbers.", "",
             "## Phases (seconds, from the proxy's view)", "",
             "| variant | " + " | ".join(PHASE_LABELS) + " |",
             "|---|" + "---|" * len(PHASE_LABELS)]
    for r in rows:
        lines.append(f"| {r['variant']} | " + " | ".join(_fmt(r["phases_seconds"].get(p), 2) for p in PHASE_LABELS) + " |")
    lines += ["", "## Energy and tax", "",
              "| variant | cold start s | cold start J | server load J | mean req J | mean req s | idle W | "
              "C_tax energy | C_tax time | C_tax paper form (N t_load / t_batch) | keep-warm break-even idle s | "
              "paper T4 Llama-1B C_tax (rag/summ/chat, mean) |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        p = r["paper_t4_llama_1b_c_tax"]
        ptxt = f"{p['rag']}/{p['summ']}/{p['chat']} ({r['paper_t4_llama_1b_c_tax_mean']})" if p else "n/a"
        lines.append(
            f"| {r['variant']} | {_fmt(r['cold_start_seconds'], 2)} | {_fmt(r['cold_start_joules'])} | "
            f"{_fmt(r['model_server_load_joules'])} | {_fmt(r['mean_request_joules'], 3)} | "
            f"{_fmt(r['mean_request_seconds'], 3)} | {_fmt(r['idle_watts'])} | {_fmt(r['c_tax_energy'])} | "
            f"{_fmt(r['c_tax_time'])} | {_fmt(r['c_tax_paper_form'])} | "
            f"{_fmt(r['keep_warm_break_even_idle_seconds'])} | {ptxt} |")
    if any(r["cold_start_to_engine_warm_seconds"] is not None for r in rows):
        lines += ["", "## Until the engine is warm (serve's background warm-up after the first token)", "",
                  "| variant | hold -> first token s | hold -> engine warm s | J to first token | J to engine warm | "
                  "C_tax energy to warm | keep-warm break-even idle s, to warm |",
                  "|---|---|---|---|---|---|---|"]
        for r in rows:
            lines.append(
                f"| {r['variant']} | {_fmt(r['cold_start_seconds'], 2)} | "
                f"{_fmt(r['cold_start_to_engine_warm_seconds'], 2)} | {_fmt(r['cold_start_joules'])} | "
                f"{_fmt(r['cold_start_to_engine_warm_joules'])} | {_fmt(r['c_tax_energy_to_engine_warm'])} | "
                f"{_fmt(r['keep_warm_break_even_to_engine_warm_idle_seconds'])} |")
    if len(rows) == 2 and all(r["c_tax_energy"] for r in rows):
        a, b = rows
        lines += ["", f"Ratio {b['variant']}/{a['variant']}: cold-start J "
                      f"{_fmt((b['cold_start_joules'] or 0) / (a['cold_start_joules'] or math.nan), 2)}, "
                      f"C_tax energy {_fmt(b['c_tax_energy'] / a['c_tax_energy'], 2)}, cold-start s "
                      f"{_fmt((b['cold_start_seconds'] or 0) / (a['cold_start_seconds'] or math.nan), 2)}."]
    lines += ["", "Definitions: docs/metrics.md, section Cold start. " + PAPER_NOTE + ". The paper's C_tax "
              "counts only vLLM's constructor (no process start, no first token) and a batch-amortised "
              "request, so it is closest to the paper-form column.", ""]
    return "\n".join(lines)
