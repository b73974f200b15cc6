"""``edge-proxy demo``: the whole thing on one machine, ending by itself.

1. Synthesizes a model (default: the tiny preset) under ``~/.cache/edge-eval`` (once; cached).
2. Starts the proxy as a subprocess with ``--spawn``: the proxy starts the model server on the
   first request, so the demo's first request is a real, measured cold start (scale from zero).
3. Sends a short mixed load (streaming chat, completions, TGI generate) with a progress bar.
4. Shows a live table of the five metrics, latency percentiles, energy per request and cost vs the
   API, each with where the number comes from (measured, estimated, configured), and the URLs of
   ``/metrics``.
5. Stops everything (also on Ctrl-C): the proxy stops the model server it started.

By default the quality score and the adaptation energy are measured (edge_proxy/demo/measured.py):
the model is LoRA-adapted on builtin:rag once (cached) and evaluated through the proxy. With
``--paper-constants`` (implied by ``--quick``) they are configured values instead: the paper's
Llama-3.2-1B rag scores, INT4 0.752 and FP16 0.742, and its LoRA rag fine-tune energy, 92,122 J.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from edge_proxy.demo import cache as demo_cache
from edge_proxy.config import ConfigError

# The paper's numbers used as configured inputs (EDGE-EVAL, ACL 2026 Industry Track; the authors'
# published results in Abdullah4152/EDGE-EVAL: results/final_36_variants_report_llama.csv for the
# scores, results/training_energy_log_llama.csv for the fine-tuning energy).
PAPER_SCORE_INT4 = 0.752            # Llama-3.2-1B LoRA rag INT4, NLI entailment rate
PAPER_SCORE_FP16 = 0.742            # the same adapter merged in FP16
PAPER_ADAPTATION_JOULES = 92_122.0  # Llama-3.2-1B LoRA rag fine-tuning energy

PROMPTS = [
    "Summarize the benefits of small language models for edge deployment.",
    "What is the capital of France?",
    "Explain energy per token in one sentence.",
    "Write a haiku about GPUs.",
    "List three ways to reduce inference cost. " * 3,
    "Translate 'good morning' into German.",
    "Why do cold starts matter for serverless inference? Give a short answer.",
    "Hello!",
]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "demo", help="run model server + proxy + load on this machine and show the five metrics live",
        description="Synthesize a model (cached), start the proxy which starts the model server on "
                    "the first request (a measured cold start), send a short mixed load, and show the "
                    "five EDGE-EVAL metrics, latency percentiles and energy per request live, each "
                    "with its source. By default the quality score and adaptation energy are measured "
                    "(LoRA-adapt on builtin:rag once, cached; edge-eval eval through the proxy); "
                    "--paper-constants uses the paper's. Ends by itself and cleans up its processes.")
    p.add_argument("--quick", action="store_true",
                   help="short run (about 10 s of load) for tests and CI; implies --paper-constants "
                        "(no adaptation or evaluation)")
    p.add_argument("--paper-constants", action="store_true",
                   help="use the paper's Llama-3.2-1B scores and LoRA energy as configured inputs instead "
                        "of measuring them (default: LoRA-adapt the model on builtin:rag once, cached "
                        "under the cache dir, and evaluate it through the proxy; edge_proxy/demo/measured.py)")
    p.add_argument("--duration", type=float, default=None, metavar="SECONDS",
                   help="seconds of load after the cold start (default 40; 8 with --quick)")
    p.add_argument("--concurrency", type=int, default=4, help="concurrent clients (default 4)")
    p.add_argument("--preset", default="tiny", choices=("tiny", "llama-3.2-1b", "qwen2.5-0.5b"),
                   help="model shape to synthesize (default tiny; llama-3.2-1b on a GPU)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="model server device (default auto: cuda if available)")
    p.add_argument("--quantization", default="none",
                   choices=("none", "fp16", "bf16", "nf4", "int8"),
                   help="model server quantization (default none)")
    p.add_argument("--energy-source", default="auto",
                   choices=("auto", "nvml", "estimated", "none"),
                   help="proxy energy source (default auto: nvml on a GPU, else estimated)")
    p.add_argument("--model-dir", default=None,
                   help="use this model directory instead of synthesizing one")
    p.add_argument("--cache-dir", default=None,
                   help="where synthesized models and the demo's adapted model are cached (default ~/.cache/edge-eval)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="also write the final numbers to DIR/demo.json and DIR/demo.md")
    p.add_argument("--keep", action="store_true",
                   help="keep the work directory (proxy config, proxy and access logs) under the "
                        "system temp dir; by default it is removed at the end (kept if the demo fails)")
    p.set_defaults(func=run)
    return p


# ---------------------------------------------------------------------------------------- helpers
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _tail(path: Path, n: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def _ensure_model(args: argparse.Namespace, console: Any) -> Path:
    if args.model_dir:
        d = Path(args.model_dir)
        if not (d / "config.json").is_file():
            raise ConfigError(f"--model-dir {d}: no config.json there")
        return d
    d = demo_cache.cache_root(args) / "models" / f"{args.preset}-seed0"
    if (d / "config.json").is_file() and demo_cache.is_complete(d):
        console.print(f"[dim]model: {d} (cached)[/dim]")
        return d
    demo_cache.build(d, lambda tmp: [sys.executable, "-m", "model_server", "synth", str(tmp), "--preset",
                                     args.preset, "--seed", "0", "--quiet"],
                     f"synthesizing the {args.preset} model (offline, random weights) ...",
                     "model synthesis", console)
    console.print(f"[dim]model: {d} (synthesized)[/dim]")
    return d


@dataclass
class ClientStats:
    ok: int = 0
    errors: int = 0
    e2e: list[float] = field(default_factory=list)
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    output_tokens: int = 0
    cold_start_seconds: float | None = None


def _pct(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


# ---------------------------------------------------------------------------------------- load
async def _one_request(session: Any, base: str, model: str, kind: int, stats: ClientStats,
                       max_tokens: int) -> None:
    prompt = random.choice(PROMPTS)
    t0 = time.perf_counter()
    try:
        if kind == 0:       # streaming chat
            body = {"model": model, "messages": [{"role": "user", "content": prompt}],
                    "max_tokens": max_tokens, "stream": True,
                    "stream_options": {"include_usage": True}}
            first = last = None
            async with session.post(base + "/v1/chat/completions", json=body) as resp:
                if resp.status != 200:
                    raise RuntimeError(resp.status)
                async for raw in resp.content:
                    line = raw.decode(errors="replace").strip()
                    if not line.startswith("data:") or line == "data: [DONE]":
                        continue
                    ev = json.loads(line[5:])
                    if ev.get("usage"):
                        stats.output_tokens += int(ev["usage"].get("completion_tokens") or 0)
                    for ch in ev.get("choices") or []:
                        if (ch.get("delta") or {}).get("content"):
                            now = time.perf_counter()
                            if first is None:
                                first = now
                                stats.ttft.append(now - t0)
                            elif last is not None:
                                stats.itl.append(now - last)
                            last = now
        elif kind == 1:     # OpenAI completion
            body = {"model": model, "prompt": prompt, "max_tokens": max_tokens}
            async with session.post(base + "/v1/completions", json=body) as resp:
                data = await resp.json(content_type=None)
                if resp.status != 200:
                    raise RuntimeError(resp.status)
                stats.output_tokens += int((data.get("usage") or {}).get("completion_tokens") or 0)
        else:               # TGI generate
            body = {"inputs": prompt, "parameters": {"max_new_tokens": max_tokens,
                                                     "details": True}}
            async with session.post(base + "/generate", json=body) as resp:
                data = await resp.json(content_type=None)
                if resp.status != 200:
                    raise RuntimeError(resp.status)
                stats.output_tokens += int((data.get("details") or {}).get("generated_tokens") or 0)
        stats.e2e.append(time.perf_counter() - t0)
        stats.ok += 1
    except Exception:
        stats.errors += 1


def _parse_metrics(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
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


class _Rows:
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
               elapsed: float, measured: Any = None) -> _Rows:
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
    t = _Rows(f"edge-eval live: model {model!r}, {elapsed:.0f} s, {stats.ok} ok / "
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
              _fmt(_val(m, "edge_proxy_economics_cold_start_tax_ratio", model=model), 1), "× E_req",
              f"cold start {e_kind}: {_fmt(cold_j, 1)} J, {_fmt(cold_s, 1)} s",
              "one cold start costs the energy of this many requests")
    t.add_row("  cold-start time ratio",
              _fmt(_val(m, "edge_proxy_economics_cold_start_time_ratio", model=model), 1), "× t_req",
              "measured", "one cold start lasts as long as this many requests")
    t.add_row("  keep-warm break-even idle",
              _fmt(_val(m, "edge_proxy_keep_warm_break_even_idle_seconds")), "s",
              f"{e_kind}: cold-start J / idle W", "idle longer than this: scaling to zero saves energy")
    t.add_row("[bold]Q_ret[/bold] quantization fidelity",
              _fmt(_val(m, "edge_proxy_quantization_fidelity_percent", model=model), 2), "%",
              msrc.get("Q_ret") or f"configured: {PAPER_SCORE_INT4} / {PAPER_SCORE_FP16}", "quality the quantized model keeps vs FP16")
    t.add_section()
    t.add_row("TTFT p50 / p95", f"{_fmt(1e3 * _pct(stats.ttft, .5), 1)} / {_fmt(1e3 * _pct(stats.ttft, .95), 1)}",
              "ms", "measured (client, streams)", "wait for the first token")
    t.add_row("ITL p50 / p95", f"{_fmt(1e3 * _pct(stats.itl, .5), 1)} / {_fmt(1e3 * _pct(stats.itl, .95), 1)}",
              "ms", "measured (client, streams)", "gap between tokens")
    t.add_row("end-to-end p50 / p95", f"{_fmt(1e3 * _pct(stats.e2e, .5), 1)} / {_fmt(1e3 * _pct(stats.e2e, .95), 1)}",
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


async def _drive(base: str, metrics_url: str, model: str, duration: float, concurrency: int,
                 max_tokens: int, console: Any, measured: Any = None,
                 after_cold_start: Any = None) -> tuple[ClientStats, dict[str, Any], float]:
    import aiohttp
    from rich.console import Group
    from rich.live import Live
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    stats = ClientStats()
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        with console.status("cold start: the proxy is starting the model server (first request "
                            "is held until it is ready) ..."):
            t0 = time.perf_counter()
            await _one_request(session, base, model, 1, stats, max_tokens)
            stats.cold_start_seconds = time.perf_counter() - t0
        if stats.ok == 0:
            raise ConfigError("the first request through the proxy failed (see the logs above)")
        console.print(f"cold start + first request: {stats.cold_start_seconds:.1f} s")
        if after_cold_start is not None:        # measured inputs: edge-eval eval through the proxy
            await asyncio.to_thread(after_cold_start)

        progress = Progress(TextColumn("mixed load"), BarColumn(), TextColumn("{task.completed:.0f}/"
                            "{task.total:.0f} s"), TimeRemainingColumn(), console=console)
        task = progress.add_task("load", total=duration)
        start = time.perf_counter()
        stop_at = start + duration
        metrics: dict[str, list[tuple[dict[str, str], float]]] = {}

        async def worker(i: int) -> None:
            k = i
            while time.perf_counter() < stop_at:
                await _one_request(session, base, model, k % 3, stats,
                                   random.randint(max(2, max_tokens // 2), max_tokens))
                k += 1

        async def scrape() -> None:
            nonlocal metrics
            with contextlib.suppress(Exception):
                async with session.get(metrics_url) as resp:
                    metrics = _parse_metrics(await resp.text())

        workers = [asyncio.create_task(worker(i)) for i in range(concurrency)]
        with Live(Group(progress, build_table(metrics, stats, model, 0.0, measured)), console=console,
                  refresh_per_second=2, transient=True) as live:
            while not all(w.done() for w in workers):
                await asyncio.sleep(1.0)
                progress.update(task, completed=min(duration, time.perf_counter() - start))
                await scrape()
                live.update(Group(progress, build_table(metrics, stats, model,
                                                        time.perf_counter() - start, measured)))
        await asyncio.gather(*workers)
        await asyncio.sleep(1.0)          # the energy ledger closes the last ticks
        await scrape()
        elapsed = time.perf_counter() - start
        if console.is_terminal:
            console.print(build_table(metrics, stats, model, elapsed, measured))
        else:                       # a log file or a pipe: plain text, no box drawing
            console.file.write(build_rows(metrics, stats, model, elapsed, measured).plain(console.width))
            console.file.flush()
        if measured is None:
            console.print("[dim]configured: the paper's Llama-3.2-1B rag scores (INT4 0.752, FP16 0.742) "
                          "and LoRA fine-tune energy (92,122 J) (--paper-constants). Prices: "
                          "economics.* settings (docs/metrics.md).[/dim]")
        else:
            console.print("[dim]measured: the score behind IPW (edge-eval eval through the proxy) and "
                          "the LoRA adaptation energy behind N_break (edge-eval adapt, cached); Q_ret "
                          "needs a reference variant. Prices: economics.* settings (docs/metrics.md).[/dim]")
    return stats, metrics, elapsed


# ---------------------------------------------------------------------------------------- main
def _write_results(out: Path, args: argparse.Namespace, model: str, stats: ClientStats,
                   metrics: dict[str, list[tuple[dict[str, str], float]]], elapsed: float,
                   console: Any, measured: Any = None) -> None:
    rows = build_rows(metrics, stats, model, elapsed, measured)
    keep = ("edge_proxy_break_even_requests", "edge_proxy_break_even_progress_ratio",
            "edge_proxy_intelligence_per_joule", "edge_proxy_intelligence_per_watt",
            "edge_proxy_system_density_tokens_per_second_per_gigabyte",
            "edge_proxy_economics_cold_start_tax_ratio", "edge_proxy_economics_cold_start_time_ratio",
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
                   **{f"{name}_p{int(q * 100)}_seconds": num(_pct(vals, q))
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


def _kill_leftover_backend(port: int) -> None:
    """Safety net: a model server still listening on our backend port after the proxy exited
    (the proxy normally stops it). Identified by its command line; killed by pid."""
    proc_dir = Path("/proc")
    if not proc_dir.is_dir():
        return
    needle = f"--port {port}"
    for p in proc_dir.iterdir():
        if not p.name.isdigit():
            continue
        try:
            cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "model_server" in cmd and needle in cmd:
            with contextlib.suppress(OSError):
                os.kill(int(p.name), signal.SIGKILL)


def _stop(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    duration = args.duration if args.duration is not None else (8.0 if args.quick else 40.0)
    if duration <= 0 or args.concurrency < 1:
        raise ConfigError("--duration must be > 0 and --concurrency >= 1")
    console = Console()
    if not console.is_terminal and not os.environ.get("COLUMNS"):
        console = Console(width=120)        # not a terminal: a sane width, not rich's 80
    model_dir = _ensure_model(args, console)
    model = args.preset if not args.model_dir else Path(args.model_dir).name
    work = Path(tempfile.mkdtemp(prefix="edge-eval-demo-"))
    measured = None
    if not (args.paper_constants or args.quick):
        from edge_proxy.demo.measured import prepare
        try:
            measured = prepare(args, model_dir, work, console)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        model_dir, model = measured.model_dir, model + "-rag-lora"
    lookup_token = secrets.token_hex(16)
    backend_port, proxy_port, metrics_port = _free_port(), _free_port(), _free_port()
    spawn = (f"{sys.executable} -m model_server serve {model_dir} --host 127.0.0.1 --port {{port}} "
             f"--device {args.device} --model-name {model}")
    if args.quantization != "none":
        spawn += f" --quantization {args.quantization}"
    cfg = {
        "proxy": {"backend_url": f"http://127.0.0.1:{backend_port}", "port": proxy_port,
                  "metrics_port": metrics_port, "model_name": model,
                  "access_log": str(work / "access.log")},
        "energy": {"source": args.energy_source, "lookup_token": lookup_token},
        "economics": measured.economics() if measured is not None else
                     {"scores": {model: PAPER_SCORE_INT4}, "reference_scores": {model: PAPER_SCORE_FP16},
                      "adaptation_joules": PAPER_ADAPTATION_JOULES},
        "coldstart": {"spawn": spawn, "max_wait_seconds": 600},
    }
    (work / "proxy.yaml").write_text(yaml.safe_dump(cfg))
    log_path = work / "proxy.log"
    log = open(log_path, "wb")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    proxy = subprocess.Popen([sys.executable, "-m", "edge_proxy", "serve", "--config",
                              str(work / "proxy.yaml")], stdout=log, stderr=subprocess.STDOUT,
                             env=env, start_new_session=True)
    base = f"http://127.0.0.1:{proxy_port}"
    metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    rc = 0
    failed = False

    def _on_sigterm(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _on_sigterm)     # clean up on SIGTERM like Ctrl-C
    try:
        deadline = time.monotonic() + 60
        with console.status("starting the proxy ..."):
            while not _http_ok(metrics_url):
                if proxy.poll() is not None or time.monotonic() > deadline:
                    raise ConfigError("the proxy did not start: " +
                                      (_tail(log_path).strip().splitlines() or ["no output"])[-1])
                time.sleep(0.2)
        console.print(f"proxy:        {base}  (OpenAI and TGI APIs)")
        console.print(f"proxy /metrics: {metrics_url}")
        console.print(f"model server: http://127.0.0.1:{backend_port}  (/metrics, /info; started by "
                      "the proxy on the first request)")
        console.print(f"logs:         {work}" + ("" if args.keep else "  (removed at the end; --keep keeps it)"))
        max_tokens = 16 if args.preset == "tiny" else 64
        evaluate = None
        if measured is not None:
            import functools

            from edge_proxy.demo.measured import run_eval
            evaluate = functools.partial(run_eval, measured, base, f"http://127.0.0.1:{metrics_port}",
                                         lookup_token, model, console)
        stats, metrics, elapsed = asyncio.run(_drive(base, metrics_url, model, duration,
                                                     args.concurrency, max_tokens, console,
                                                     measured, evaluate))
        if args.out:
            _write_results(Path(args.out), args, model, stats, metrics, elapsed, console, measured)
        if stats.errors:
            console.print(f"[yellow]{stats.errors} requests failed[/yellow]")
        console.print(f"Prometheus: scrape {metrics_url} and load grafana/rules/edge-eval.rules.yml; "
                      "dashboard: grafana/dashboards/edge-eval.json")
    except KeyboardInterrupt:
        console.print("interrupted: stopping the proxy and the model server")
        rc = 130
    except BaseException:
        failed = True
        raise
    finally:
        with console.status("stopping the proxy and the model server ..."):
            _stop(proxy)
            _kill_leftover_backend(backend_port)
            log.close()
        signal.signal(signal.SIGTERM, previous)
        if args.keep or failed:
            console.print(f"logs kept: {work}" + ("" if args.keep else " (the demo failed)"))
        else:
            shutil.rmtree(work, ignore_errors=True)
    return rc
