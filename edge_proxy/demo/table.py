"""The demo's output: parse a /metrics scrape, and the table of the five metrics, latency and energy
(each row with its source) rendered with rich, as plain text, markdown, or ``demo.json`` / ``demo.md``
(``--out``). Pure formatting of numbers it is given: must not send requests or start processes."""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from edge_proxy.demo.load import ClientStats, pct
from edge_proxy.demo.paper import PAPER_ADAPTATION_JOULES, PAPER_SCORE_FP16, PAPER_SCORE_INT4


def parse_metrics(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append((dict(s.labels), float(s.value)))
    return out


def _val(m: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str) -> float:
    for lab, v in m.get(name, []):
        if all(lab.get(k) == x for k, x in labels.items()):
            return v
    return math.nan


def _fmt(v: float, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if math.isinf(v):
        return "∞ (never)"
    if v != 0 and (abs(v) >= 1e5 or abs(v) < 10 ** -digits):
        return f"{v:.{digits}g}"
    return f"{v:,.{digits}f}".rstrip("0").rstrip(".") if abs(v) < 1000 else f"{v:,.0f}"


class Rows:
    """Rows of the demo table: rendered with rich, or written as markdown / JSON (``--out``)."""

    def __init__(self, title: str) -> None:
        self.title = title
        self.rows: list[tuple[str, str, str, str, str] | None] = []      # None = section break

    def add_row(self, metric: str, value: str, unit: str, source: str, meaning: str = "") -> None:
        self.rows.append((metric, value, unit, source, meaning))

    def add_section(self) -> None:
        self.rows.append(None)

    def rich(self) -> Any:
        from rich.table import Table

        t = Table(title=self.title, title_justify="left", expand=False)
        t.add_column("metric")
        t.add_column("value", justify="right")
        t.add_column("unit")
        t.add_column("source")
        t.add_column("what it means")
        for r in self.rows:
            if r is None:
                t.add_section()
            else:
                t.add_row(*r)
        return t

    def markdown(self) -> str:
        import re

        lines = [f"**{self.title}**", "", "| metric | value | unit | source | what it means |",
                 "|---|---|---|---|---|"]
        for r in self.rows:
            if r is not None:
                cells = [re.sub(r"\[/?[a-z]+\]", "", c).strip().replace("|", "/") for c in r]
                lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"

    def plain(self, width: int = 120) -> str:
        """Plain text (no box drawing, no markup) at most ``width`` columns wide: for a log file or
        a pipe. The source and meaning columns wrap."""
        import re
        import textwrap

        rows = [None if r is None else [re.sub(r"\[/?[a-z]+\]", "", c).strip() for c in r] for r in self.rows]
        head = ["metric", "value", "unit", "source", "what it means"]
        body = [r for r in rows if r is not None]
        w = [max(len(r[i]) for r in [head, *body]) for i in range(3)]
        rest = max(30, width - sum(w) - 4 * 2)
        w += [rest // 2, rest - rest // 2]
        out = [self.title, ""]

        def emit(cells: list[str]) -> None:
            wrapped = [textwrap.wrap(c, w[i]) or [""] if i >= 3 else [c] for i, c in enumerate(cells)]
            for k in range(max(len(x) for x in wrapped)):
                parts = [(x[k] if k < len(x) else "") for x in wrapped]
                line = "  ".join(p.rjust(w[i]) if i == 1 else p.ljust(w[i]) for i, p in enumerate(parts))
                out.append(line.rstrip())

        emit(head)
        out.append("-" * min(width, sum(w) + 8))
        for r in rows:
            if r is None:
                out.append("")
            else:
                emit(r)
        return "\n".join(out) + "\n"


def build_table(m: dict[str, list[tuple[dict[str, str], float]]], stats: ClientStats, model: str,
                elapsed: float, measured: Any = None) -> Any:
    """The rich table of the five metrics, latency and energy (see :func:`build_rows`)."""
    return build_rows(m, stats, model, elapsed, measured).rich()


def build_rows(m: dict[str, list[tuple[dict[str, str], float]]], stats: ClientStats, model: str,
               elapsed: float, measured: Any = None) -> Rows:
    """``measured``: a :class:`edge_proxy.demo.measured.MeasuredInputs` (sources of N_break, IPW
    and Q_ret from the adaptation and evaluation files), or None for the paper's constants."""
    src_info = [lab for lab, v in m.get("edge_proxy_energy_source_info", []) if v]
    esrc = src_info[0].get("source", "?") if src_info else "none"
    scope = src_info[0].get("scope", "") if src_info else ""
    cpu_of = {"backend-process-tree": "model server's CPU time", "whole-machine": "whole machine's CPU time"}
    energy_word = {"nvml": "measured (NVML counter)", "remote": "measured (remote /energy)",
                   "replay": "replayed trace",
                   "estimated": f"estimated ({cpu_of.get(scope, 'CPU time')} x W)"}.get(esrc, "no energy source")
    e_kind = "measured" if esrc in ("nvml", "remote") else ("estimated" if esrc == "estimated" else esrc)
    weight = math.nan
    wsrc = "n/a"
    for lab, v in m.get("edge_proxy_model_weight_bytes", []):
        if lab.get("model") == model:
            weight, wsrc = v, lab.get("source", "?")
    req = _val(m, "edge_proxy_economics_requests_total", model=model)
    joules = _val(m, "edge_proxy_economics_energy_joules_total", model=model)
    tok_out = _val(m, "edge_proxy_economics_tokens_total", model=model, type="output")
    tok_in = _val(m, "edge_proxy_economics_tokens_total", model=model, type="input")
    local_usd = (_val(m, "edge_proxy_energy_cost_usd_total", model=model)
                 + _val(m, "edge_proxy_hardware_cost_usd_total", model=model))
    api_usd = _val(m, "edge_proxy_api_equivalent_cost_usd_total", model=model)
    tokens = tok_in + tok_out
    cold_j = _val(m, "edge_proxy_economics_cold_start_energy_joules_total", model=model)
    cold_s = _val(m, "edge_proxy_economics_cold_start_seconds_total", model=model)

    msrc = {}
    if measured is not None:
        from edge_proxy.demo.measured import sources
        msrc = sources(measured, m, model, e_kind)
    t = Rows(f"edge-eval live: model {model!r}, {elapsed:.0f} s, {stats.ok} ok / "
              f"{stats.errors} errors")
    t.add_row("[bold]N_break[/bold] break-even", _fmt(_val(m, "edge_proxy_break_even_requests", model=model), 1),
              "requests", msrc.get("N_break") or
              f"energy {e_kind}; prices + adaptation {PAPER_ADAPTATION_JOULES / 1e3:,.0f} kJ configured",
              "requests until self-hosting has cost less than the API")
    t.add_row("  served so far / N_break",
              _fmt(100 * _val(m, "edge_proxy_break_even_progress_ratio", model=model), 1), "%",
              "measured requests", "how far along the way to break-even")
    t.add_row("[bold]IPW[/bold] intelligence per joule",
              _fmt(_val(m, "edge_proxy_intelligence_per_joule", model=model), 4), "1/J",
              msrc.get("IPW") or f"score {PAPER_SCORE_INT4} configured; J {e_kind}", "task quality per joule: higher is better")
    t.add_row("[bold]ρ_sys[/bold] system density",
              _fmt(_val(m, "edge_proxy_system_density_tokens_per_second_per_gigabyte", model=model), 1),
              "tokens/s/GB", f"tokens/s measured; weights {wsrc} ({_fmt(weight / 1e6, 1)} MB)",
              "output speed per GB of model weights")
    t.add_row("[bold]C_tax[/bold] cold-start tax",
              _fmt(_val(m, "edge_proxy_cold_start_tax_energy_ratio", model=model), 1), "× E_req",
              f"cold start {e_kind}: {_fmt(cold_j, 1)} J, {_fmt(cold_s, 1)} s",
              "one cold start costs the energy of this many requests")
    t.add_row("  cold-start time ratio",
              _fmt(_val(m, "edge_proxy_cold_start_tax_time_ratio", model=model), 1), "× t_req",
              "measured", "one cold start lasts as long as this many requests")
    t.add_row("  keep-warm break-even idle",
              _fmt(_val(m, "edge_proxy_keep_warm_break_even_idle_seconds")), "s",
              f"{e_kind}: cold-start J / idle W", "idle longer than this: scaling to zero saves energy")
    t.add_row("[bold]Q_ret[/bold] quantization fidelity",
              _fmt(_val(m, "edge_proxy_quantization_fidelity_percent", model=model), 2), "%",
              msrc.get("Q_ret") or f"configured: {PAPER_SCORE_INT4} / {PAPER_SCORE_FP16}", "quality the quantized model keeps vs FP16")
    t.add_section()
    t.add_row("TTFT p50 / p95", f"{_fmt(1e3 * pct(stats.ttft, .5), 1)} / {_fmt(1e3 * pct(stats.ttft, .95), 1)}",
              "ms", "measured (client, streams)", "wait for the first token")
    t.add_row("ITL p50 / p95", f"{_fmt(1e3 * pct(stats.itl, .5), 1)} / {_fmt(1e3 * pct(stats.itl, .95), 1)}",
              "ms", "measured (client, streams)", "gap between tokens")
    t.add_row("end-to-end p50 / p95", f"{_fmt(1e3 * pct(stats.e2e, .5), 1)} / {_fmt(1e3 * pct(stats.e2e, .95), 1)}",
              "ms", "measured (client)", "whole request")
    t.add_section()
    t.add_row("energy per request", _fmt(joules / req if req else math.nan), "J", energy_word,
              "its share of the energy, idle included")
    t.add_row("energy per output token", _fmt(joules / tok_out if tok_out else math.nan, 4), "J/token",
              energy_word, "the same per generated token")
    t.add_row("cost per 1M tokens: local / API",
              f"{_fmt(1e6 * local_usd / tokens if tokens else math.nan, 4)} / "
              f"{_fmt(1e6 * api_usd / tokens if tokens else math.nan, 4)}", "USD",
              f"energy {e_kind}; prices configured", "self-hosted vs the API's price")
    return t



def write_results(out: Path, args: argparse.Namespace, model: str, stats: ClientStats,
                  metrics: dict[str, list[tuple[dict[str, str], float]]], elapsed: float,
                  console: Any, measured: Any = None) -> None:
    rows = build_rows(metrics, stats, model, elapsed, measured)
    keep = ("edge_proxy_break_even_requests", "edge_proxy_break_even_progress_ratio",
            "edge_proxy_intelligence_per_joule", "edge_proxy_intelligence_per_watt",
            "edge_proxy_system_density_tokens_per_second_per_gigabyte",
            "edge_proxy_cold_start_tax_energy_ratio", "edge_proxy_cold_start_tax_time_ratio",
            "edge_proxy_quantization_fidelity_percent", "edge_proxy_joules_per_request",
            "edge_proxy_model_weight_bytes", "edge_proxy_economics_requests_total",
            "edge_proxy_economics_tokens_total", "edge_proxy_economics_energy_joules_total",
            "edge_proxy_energy_cost_usd_total", "edge_proxy_hardware_cost_usd_total",
            "edge_proxy_api_equivalent_cost_usd_total", "edge_proxy_economics_cold_start_energy_joules_total",
            "edge_proxy_economics_cold_start_seconds_total", "edge_proxy_keep_warm_break_even_idle_seconds",
            "edge_proxy_energy_source_info", "edge_proxy_gpu_energy_joules_total",
            "edge_proxy_idle_energy_joules_total")

    def num(v: float) -> float | str:
        return v if math.isfinite(v) else str(v)

    data = {
        "command": " ".join(sys.argv), "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "model": model, "preset": args.preset, "device": args.device,
        "quantization": args.quantization, "load_seconds": elapsed,
        "client": {"ok": stats.ok, "errors": stats.errors, "output_tokens": stats.output_tokens,
                   "cold_start_and_first_request_seconds": stats.cold_start_seconds,
                   **{f"{name}_p{int(q * 100)}_seconds": num(pct(vals, q))
                      for name, vals in (("ttft", stats.ttft), ("itl", stats.itl), ("e2e", stats.e2e))
                      for q in (0.5, 0.95)}},
        "metrics": {k: [{"labels": lab, "value": num(v)} for lab, v in metrics.get(k, [])]
                    for k in keep},
        "table": [list(r) for r in rows.rows if r is not None],
        "inputs": "paper-constants" if measured is None else
                  {"adaptation": str(measured.adaptation_path), "adapted_model": str(measured.model_dir)},
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo.json").write_text(json.dumps(data, indent=2))
    (out / "demo.md").write_text(rows.markdown())
    console.print(f"results: {out / 'demo.json'}, {out / 'demo.md'}")

