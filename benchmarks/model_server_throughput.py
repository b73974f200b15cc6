#!/usr/bin/env python
"""Model server throughput: the HTTP server at several concurrencies vs sequential ``model.generate``.

For each quantization (``fp16``, ``nf4``, and ``gptq`` when gptqmodel is importable):

1. ``model-server serve`` (a subprocess, the ``--engine`` asked for) with the synthesized model;
2. closed-loop load through the OpenAI streaming API (``/v1/completions``, prompts of exactly
   ``--prompt-tokens`` token ids, ``--new-tokens`` new tokens each with ``ignore_eos``, usage from
   ``stream_options.include_usage``) at each concurrency level: ``c`` requests in flight, ``2c``
   requests (at least 4) per level. Reported: aggregate output tokens/s (all completion tokens /
   wall time of the level), TTFT p50/p99 (request sent -> first token chunk), J/token from the NVML
   energy counter when there is one;
3. the server is stopped, and the same checkpoint with the same quantization is loaded in this process
   (``model_server.loading.load_model``) for the baseline: plain ``model.generate`` one request at a
   time (batch 1), same prompts, ``min_new_tokens = max_new_tokens``;
4. ratios: server tokens/s over sequential tokens/s at each level, and rho_sys = tokens/s per GB of
   weights as loaded (``/info`` weight_bytes) next to the paper's 6,930 tokens/s/GB (T4, vLLM, 1B INT4).

Writes ``model_server_throughput.json`` and ``model_server_throughput.md`` under ``--out``.
CPU smoke: ``--preset tiny --concurrency 1,4 --new-tokens 8``. GPU: defaults (llama-3.2-1b).
HTTP vs in-process throughput to quote: ``benchmarks/steady_state.py`` (steady-state windows, same run).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from model_server_load import _energy_mj, run_level, sequential_generate
from model_server_process import Server, log, make_prompts, maybe_make_gptq, synth_model
from support import utc_date

PAPER_RHO_SYS = 6930.0          # tokens/s/GB, mean of Llama-3.2-1B INT4 on a T4 with vLLM (EDGE-EVAL results/rho_sys.csv)
TARGET_RATIO_AT_32 = 8.0        # issue 2: at concurrency 32, >= 8x sequential generate


# ----------------------------------------------------------------------------- report
COLUMNS = ("quantization", "engine", "weights (GB)", "concurrency", "tokens/s", "x sequential", "TTFT p50 (ms)",
           "TTFT p99 (ms)", "rho_sys (tokens/s/GB)", "paper rho_sys", "J/token")


def table_rows(report: dict[str, Any]) -> list[tuple[str, ...]]:
    """One row per sequential baseline (once per quantization) and per measured level."""
    rows: list[tuple[str, ...]] = []
    baseline_done: set[str] = set()
    for v in report["variants"]:
        q = v["quantization"]
        seq = v.get("sequential")
        gb = v.get("weight_bytes", 0) / 1e9
        if seq and q not in baseline_done and gb > 0:
            baseline_done.add(q)
            rows.append((q, "model.generate", f"{gb:.4g}", "1 (sequential)", f"{seq['tokens_per_s']:.1f}", "1.00",
                         f"{seq['ttft_p50_s'] * 1e3:.1f}", "", f"{seq['tokens_per_s'] / gb:.0f}",
                         f"{PAPER_RHO_SYS:.0f}", ""))
        for lvl in v.get("levels", []):
            jt = f"{lvl['joules_per_token']:.4f}" if lvl.get("joules_per_token") is not None else "n/a"
            rows.append((q, str(v.get("engine")), f"{gb:.4g}", str(lvl["concurrency"]), f"{lvl['tokens_per_s']:.1f}",
                         f"{lvl['ratio_vs_sequential']:.2f}", f"{lvl['ttft_p50_s'] * 1e3:.1f}",
                         f"{lvl['ttft_p99_s'] * 1e3:.1f}", f"{lvl['rho_sys']:.0f}", f"{PAPER_RHO_SYS:.0f}", jt))
        if v.get("skipped"):
            rows.append((q, str(v.get("engine")), "skipped", v["skipped"].replace("|", "/"), "", "", "", "", "", "", ""))
    return rows


def render_markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    lines = [
        "# Model server throughput",
        "",
        f"- date: {report['date']}",
        f"- device: {env['device_name']} ({env['device']}); torch {env['torch']}, transformers {env['transformers']}",
        f"- command: `{report['command']}`",
        f"- model: {report['preset']} (synthetic weights), prompts {report['prompt_tokens']} tokens, "
        f"{report['new_tokens']} new tokens, greedy, ignore_eos; OpenAI streaming API, closed loop",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(report)]
    lines += ["", f"Target (issue 2): at concurrency 32, at least {TARGET_RATIO_AT_32:.0f}x sequential generate.",
              "rho_sys = output tokens/s / weight GB as loaded (measured from the tensors, `/info` weight_bytes); "
              "the paper's 6,930 tokens/s/GB is Llama-3.2-1B INT4 on a T4 with vLLM (nominal size). "
              "J/token: NVML energy counter over the whole level (idle draw included).", ""]
    for v in report["variants"]:
        if v.get("target_at_32") is not None:
            lines.append(f"- {v['quantization']} / {v.get('engine')}: at concurrency 32, {v['target_at_32']:.2f}x "
                         f"sequential ({'meets' if v['target_at_32'] >= TARGET_RATIO_AT_32 else 'below'} the 8x target)")
    return "\n".join(lines) + "\n"


def print_table(report: dict[str, Any]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except Exception:
        print(render_markdown(report))
        return
    t = Table(title=f"model server throughput ({report['environment']['device_name']})")
    for col in COLUMNS:
        t.add_column(col, justify="right")
    for row in table_rows(report):
        t.add_row(*row)
    Console(width=180).print(t)


# ----------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="llama-3.2-1b", choices=("tiny", "llama-3.2-1b", "qwen2.5-0.5b"))
    p.add_argument("--model-dir", default=None, help="serve this model directory instead of synthesizing")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--engine", default="auto",
                   help="comma list of auto,fast,transformers: each is served and measured in this run "
                        "(e.g. transformers,fast for both side by side; default: auto)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--quantizations", default="fp16,nf4,gptq",
                   help="comma list of fp16,bf16,nf4,int8,gptq,none (gptq: only when gptqmodel imports)")
    p.add_argument("--concurrency", default="1,8,32,64", help="comma list of concurrency levels")
    p.add_argument("--requests-factor", type=float, default=2.0, help="requests per level = factor x concurrency (min 4)")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--sequential-requests", type=int, default=4, help="requests in the sequential baseline")
    p.add_argument("--ready-timeout", type=float, default=600.0)
    p.add_argument("--out", required=True, help="directory for JSON + markdown results")
    p.add_argument("--work-dir", default=None,
                   help="where synthesized models go (kept; default: a temp dir removed at the end)")
    args = p.parse_args(argv)
    try:
        args.levels = sorted({int(x) for x in args.concurrency.split(",") if x.strip()})
        if not args.levels or min(args.levels) < 1:
            raise ValueError
    except ValueError:
        p.error(f"--concurrency must be a comma list of positive integers, got {args.concurrency!r}")
    args.engines = [e.strip() for e in args.engine.split(",") if e.strip()]
    if not args.engines or any(e not in ("auto", "fast", "transformers") for e in args.engines):
        p.error(f"--engine must be a comma list of auto, fast, transformers; got {args.engine!r}")
    args.quants = [q.strip() for q in args.quantizations.split(",") if q.strip()]
    bad = [q for q in args.quants if q not in ("fp16", "bf16", "nf4", "int8", "gptq", "none")]
    if bad:
        p.error(f"unknown quantization(s): {', '.join(bad)}")
    if args.prompt_tokens < 1 or args.new_tokens < 1:
        p.error("--prompt-tokens and --new-tokens must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch
    import transformers

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    device_name = torch.cuda.get_device_name(0) if device == "cuda" else (platform.processor() or platform.machine())
    # synthesized / quantized models never go under --out (that directory is fetched back)
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="ms_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        return _run(args, out, work, device, device_name, torch, transformers)
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)


def _run(args, out: Path, work: Path, device: str, device_name: str, torch, transformers) -> int:
    model_dir = Path(args.model_dir) if args.model_dir else synth_model(args.preset, work, args.seed)
    n_prompts = max(max(args.levels) * 2, args.sequential_requests, 4)
    prompts = make_prompts(model_dir, n_prompts, args.prompt_tokens)
    max_total = args.prompt_tokens + args.new_tokens + 8
    report: dict[str, Any] = {
        "benchmark": "model_server_throughput", "date": utc_date("%Y-%m-%dT%H:%M:%S+00:00"),
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "preset": args.preset if not args.model_dir else str(args.model_dir), "engines": args.engines,
        "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "levels": args.levels,
        "paper_rho_sys_tokens_per_s_per_gb": PAPER_RHO_SYS,
        "environment": {"device": device, "device_name": device_name, "torch": torch.__version__,
                        "transformers": transformers.__version__, "python": platform.python_version(),
                        "cpus": os.cpu_count()},
        "variants": [],
    }

    def save() -> None:
        (out / "model_server_throughput.json").write_text(json.dumps(report, indent=2) + "\n")
        (out / "model_server_throughput.md").write_text(render_markdown(report))

    for quant in args.quants:
        serve_dir = model_dir
        if quant == "gptq":
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(model_dir)
            gdir, why = maybe_make_gptq(model_dir, work, [tok.decode(p) for p in prompts[:32]])
            if gdir is None:
                report["variants"].append({"quantization": quant, "engine": "-", "skipped": why})
                log(f"gptq skipped: {why}")
                save()
                continue
            serve_dir = gdir
        log(f"[{quant}] sequential model.generate baseline ({args.sequential_requests} requests)")
        try:
            seq = sequential_generate(serve_dir, quant, device, prompts, args.new_tokens, args.sequential_requests)
        except Exception as exc:
            why = f"baseline failed: {type(exc).__name__}: {str(exc)[:300]}"
            report["variants"].append({"quantization": quant, "engine": "-", "skipped": why})
            log(why)
            save()
            continue
        for engine in args.engines:
            variant: dict[str, Any] = {"quantization": quant, "engine_requested": engine, "engine": engine,
                                       "sequential": seq, "weight_bytes": seq["weight_bytes"], "levels": []}
            report["variants"].append(variant)
            log(f"[{quant}/{engine}] starting server (device {device})")
            srv = Server(serve_dir, quant, engine, device, max(args.levels), max_total,
                         out / f"server-{quant}-{engine}.log")
            try:
                info = srv.wait_ready(args.ready_timeout)
                variant.update(engine=info.get("engine"), weight_bytes=info["weight_bytes"], dtype=info.get("dtype"),
                               server_startup=info.get("startup"),
                               load_energy_joules=info.get("load_energy_joules"), devices=info.get("devices"))
                uuids = [d["uuid"] for d in info.get("devices") or [] if d.get("uuid")]
                asyncio.run(run_level(srv.url, info["model_id"], prompts, 2, 2, min(8, args.new_tokens)))  # warm-up
                for c in args.levels:
                    n_req = max(4, int(round(args.requests_factor * c)))
                    e0 = _energy_mj(uuids)
                    lvl = asyncio.run(run_level(srv.url, info["model_id"], prompts, c, n_req, args.new_tokens))
                    e1 = _energy_mj(uuids)
                    if e0 and e1:
                        joules = sum(max(0, e1[u] - e0[u]) for u in e0) / 1000.0
                        lvl["energy_joules"] = joules
                        lvl["joules_per_token"] = (joules / lvl["completion_tokens"]
                                                   if lvl["completion_tokens"] else None)
                    lvl["rho_sys"] = lvl["tokens_per_s"] / (info["weight_bytes"] / 1e9)
                    lvl["ratio_vs_sequential"] = lvl["tokens_per_s"] / seq["tokens_per_s"]
                    variant["levels"].append(lvl)
                    log(f"[{quant}/{variant['engine']}] c={c}: {lvl['tokens_per_s']:.1f} tokens/s "
                        f"({lvl['ratio_vs_sequential']:.2f}x sequential), TTFT p50 {lvl['ttft_p50_s'] * 1e3:.1f} ms")
                    save()
            except Exception as exc:
                variant["skipped"] = f"server run failed: {type(exc).__name__}: {str(exc)[:300]}"
                log(variant["skipped"])
            finally:
                srv.stop()
            at32 = [lvl for lvl in variant["levels"] if lvl["concurrency"] == 32]
            variant["target_at_32"] = at32[0]["ratio_vs_sequential"] if at32 else None
            save()

    save()
    print_table(report)
    log(f"wrote {out / 'model_server_throughput.json'} and {out / 'model_server_throughput.md'}")
    ok = any(not v.get("skipped") for v in report["variants"])
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
