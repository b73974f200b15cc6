"""``edge-eval bench``: run a variant grid (or a preset) and record raw rows and summaries.

The grid is validated completely before anything starts (one line with the file position, exit
2). Variants run one after another (see :mod:`edge_eval.bench_run`); each finished or failed
variant appends one record to ``variants.jsonl`` (flushed and fsynced), so ``--resume`` skips the
finished ones and re-runs the failed ones. Exit 0 when every variant succeeded, 1 otherwise.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from edge_eval.bench_grid import Grid, Variant, load_grid, parse
from edge_eval.errors import UsageError
from edge_eval.results_dir import GRID_FILE, REQUESTS_FILE, VARIANTS_FILE, read_records

PRESETS: dict[str, str] = {
    # The paper's grid (EDGE-EVAL, ACL 2026 Industry Track, §4): six instruct models, three tasks,
    # FP16/INT8/INT4 after LoRA, one merged variant after QLoRA, 100 requests at once. Needs a
    # network (hub ids) and a CUDA GPU.
    "paper": """
models:
  - {path: meta-llama/Llama-3.2-1B-Instruct, name: llama-1b, size_label: 1B}
  - {path: meta-llama/Llama-3.2-3B-Instruct, name: llama-3b, size_label: 3B}
  - {path: meta-llama/Llama-3.1-8B-Instruct, name: llama-7b, size_label: 7B}
  - {path: Qwen/Qwen2.5-1.5B-Instruct, name: qwen-1b, size_label: 1B}
  - {path: Qwen/Qwen2.5-3B-Instruct, name: qwen-3b, size_label: 3B}
  - {path: Qwen/Qwen2.5-7B-Instruct, name: qwen-7b, size_label: 7B}
quantizations: [fp16, int8, nf4]
tasks: [rag, summarization, chat]
adaptation: [lora, qlora]
load: {batch_requests: 100, max_tokens: 128, concurrency: [1, 8, 32, 100], sweep_requests: 100}
eval: {limit: 200}
passes: 3
device: cuda
""",
    # Synthesized models (random weights, real shapes) and builtin tasks: runs without a network.
    "offline": """
models:
  - {synth: llama-3.2-1b, size_label: 1B}
  - {synth: qwen2.5-0.5b}
quantizations: [bf16, int8, nf4]
tasks: [rag, summarization, chat]
adaptation: [none]
load: {batch_requests: 100, max_tokens: 32, concurrency: [1, 8, 32], sweep_requests: 32}
eval: {limit: 50}
passes: 3
device: auto
""",
    "offline-quick": """
models:
  - {synth: tiny}
quantizations: [none]
tasks: [{name: rag, limit: 6}]
adaptation: [none]
load: {batch_requests: 8, max_tokens: 4, concurrency: [1, 4], sweep_requests: 4}
eval: {max_tokens: 8, concurrency: 2}
passes: 2
device: cpu
energy_source: estimated
""",
}


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "bench", help="run a variant grid: cold start, fixed batch, sweep, eval per variant",
        description=(
            "Run every variant of GRID.yaml (or a --preset) through model-server behind edge-proxy "
            "(spawned on the first request, so load time and energy are measured by the proxy's "
            "cold-start path), the fixed batch, the concurrency sweep and edge-eval eval. Writes "
            "RESULTS_DIR/variants.jsonl (summaries), requests.jsonl (raw rows), eval/, logs/. "
            "Then: edge-eval report RESULTS_DIR --out REPORT_DIR. See docs/evaluation.md."))
    p.add_argument("grid", nargs="?", type=Path, help="grid YAML file (or use --preset)")
    p.add_argument("--preset", choices=("paper", "offline"), help="a built-in grid")
    p.add_argument("--quick", action="store_true",
                   help="with --preset offline: one tiny model, small batch (CI, minutes on a CPU)")
    p.add_argument("--out", type=Path, required=True, help="results directory")
    p.add_argument("--resume", action="store_true", help="skip finished variants, retry failed ones")
    p.add_argument("--print-grid", action="store_true", help="print the preset's YAML and exit")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _grid(args: argparse.Namespace) -> tuple[Grid, str]:
    if (args.grid is None) == (args.preset is None):
        raise UsageError("give either GRID.yaml or --preset paper|offline")
    if args.quick and args.preset != "offline":
        raise UsageError("--quick goes with --preset offline")
    if args.preset:
        name = "offline-quick" if args.quick else args.preset
        return parse(PRESETS[name], f"preset:{name}"), PRESETS[name]
    return load_grid(args.grid), args.grid.read_text(encoding="utf-8")


def _synth(root: Path, preset: str, seed: int) -> str:
    out = root / "models" / preset
    proc = subprocess.run([sys.executable, "-m", "model_server", "synth", str(out), "--preset",
                           preset, "--seed", str(seed), "--quiet"], capture_output=True, text=True,
                          timeout=1800)
    if proc.returncode != 0:
        raise RuntimeError(f"model-server synth {preset}: {proc.stderr.strip()[-300:]}")
    return str(out)


def _adapt(grid: Grid, v: Variant, model: str, root: Path) -> tuple[str, float]:
    """``edge-eval adapt`` once per (model, method, task), cached: (merged path, C_train joules)."""
    out = root / "adapt" / f"{v.name.rsplit('-', 3)[0]}-{v.adaptation}-{v.task}"
    doc_path = out / "adaptation.json"
    doc: dict[str, Any] = json.loads(doc_path.read_text()) if doc_path.exists() else {}
    if not doc.get("merged_path"):
        cmd = [sys.executable, "-m", "edge_eval", "adapt", model, "--method", v.adaptation,
               "--task", v.task, "--out", str(out), "--merge", "--steps", str(grid.adapt_steps),
               "--limit", str(grid.adapt_limit), "--device", grid.device, "--quiet"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=24 * 3600)
        if proc.returncode != 0:
            raise RuntimeError(f"edge-eval adapt: {(proc.stderr.strip().splitlines() or [''])[-1]}")
        doc = json.loads(doc_path.read_text())
    return str(doc["merged_path"]), float(doc["joules"])


def run(args: argparse.Namespace) -> int:
    grid, text = _grid(args)
    if args.print_grid:
        sys.stdout.write(text.lstrip())
        return 0
    root: Path = args.out
    vfile = root / VARIANTS_FILE
    if vfile.exists() and vfile.stat().st_size and not args.resume:
        raise UsageError(f"{root} already holds results; use --resume or another --out")
    root.mkdir(parents=True, exist_ok=True)
    (root / GRID_FILE).write_text(json.dumps(grid.to_json(), indent=1, sort_keys=True) + "\n")
    records, _ = read_records(vfile)
    done = {r["variant"]: r for r in records if r.get("status") == "ok"}
    scores = {k: r["measurements"].get("score") for k, r in done.items()}
    from rich.progress import Progress

    from edge_eval.bench_run import run_variant

    failed = 0
    synth_paths: dict[str, str] = {}
    with open(vfile, "a", encoding="utf-8") as vf, \
            open(root / REQUESTS_FILE, "a", encoding="utf-8") as raw, \
            Progress(disable=args.quiet, transient=True) as bar:
        job = bar.add_task("bench", total=len(grid.variants))
        for v in grid.variants:
            bar.update(job, description=v.name)
            if v.name in done:
                bar.advance(job)
                continue
            rec: dict[str, Any] = {"variant": v.name}
            try:
                model = v.model
                if v.synth:
                    if v.synth not in synth_paths:
                        synth_paths[v.synth] = _synth(root, v.synth, grid.seed)
                    model = synth_paths[v.synth]
                adapt_j = 0.0
                if v.adaptation != "none":
                    model, adapt_j = _adapt(grid, v, model, root)
                ref = scores.get(v.reference) if v.reference else None
                rec.update(status="ok", error=None,
                           **run_variant(grid, v, model, adapt_j, root, ref, raw))
                scores[v.name] = rec["measurements"]["score"]
            except Exception as exc:    # noqa: BLE001 - any failure is this variant's; go on
                failed += 1
                msg = str(exc).strip().splitlines()
                rec.update(status="failed", error=(msg[0] if msg else type(exc).__name__)[:500])
                print(f"edge-eval bench: {v.name} failed: {rec['error']}", file=sys.stderr)
            vf.write(json.dumps(rec, sort_keys=True) + "\n")
            vf.flush()
            os.fsync(vf.fileno())
            bar.advance(job)
    n = len(grid.variants)
    print(f"edge-eval bench: {n - failed}/{n} variants done -> {root} "
          f"(edge-eval report {root} --out REPORT_DIR)", file=sys.stderr)
    return 0 if failed == 0 else 1
