"""Measured inputs for ``edge-proxy demo`` (the default; ``--paper-constants`` turns them off). Runs
edge-eval as subprocesses: must not import edge_eval or the proxy's internals.

Instead of the paper's constants, the demo measures its own quality and adaptation inputs:

1. ``edge-eval adapt`` LoRA-adapts the demo's model on ``builtin:rag`` and merges it (once; the
   merged model and ``adaptation.json`` are cached under ``<cache>/demo/<key>``, the key naming the
   base model, seed, steps and :data:`CACHE_VERSION`; later runs reuse them).
2. The proxy serves the adapted model with ``economics.quality_results_path`` pointing at the demo's
   runs directory and ``economics.adaptation_results_path`` at the cached ``adaptation.json``.
3. After the cold start, a short ``edge-eval eval`` of held-out ``builtin:rag`` items runs through
   the proxy; the proxy reads its ``results.json`` live, so IPW's score is measured and N_break's
   C_train is the adaptation's energy (measured on NVML, estimated on CPU).

4. Q_ret: the demo serves a quantized variant (``--quantization``, default int4); its reference,
   the adapted model unquantized, is evaluated once on the same held-out items
   (:mod:`edge_proxy.demo.reference`, cached next to the adapted model) and the served run names it
   (``--reference-model``), so the proxy pairs the two runs item by item. Served unquantized
   (``--quantization none``), the model is its own reference and Q_ret is shown as n/a.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge_proxy.demo import cache as demo_cache
from edge_proxy.config import ConfigError

CACHE_VERSION = 1               # bump when the adapt recipe below changes
ADAPT_STEPS = 150               # LoRA steps: the tiny model's held-out F1 is clearly above base's
EVAL_LIMIT = 16                 # held-out builtin:rag items evaluated through the proxy
EVAL_MAX_TOKENS = 6             # builtin rag answers are one short code word


@dataclass(frozen=True)
class MeasuredInputs:
    """Where the demo's measured quality and adaptation inputs live."""

    model_dir: Path             # the merged (LoRA-adapted) model the proxy serves
    adaptation_path: Path       # adaptation.json (C_train)
    adaptation: dict[str, Any]
    runs_dir: Path              # edge-eval eval results directory the proxy reads
    reference_model: str | None = None   # Q_ret's reference run (in runs_dir), when served quantized
    quantization: str = "none"

    def economics(self) -> dict[str, Any]:
        """The proxy's ``economics`` settings: scores and C_train from the files, nothing typed in."""
        return {"quality_results_path": str(self.runs_dir),
                "adaptation_results_path": str(self.adaptation_path)}

    @property
    def energy_source(self) -> str:
        return str(self.adaptation.get("energy_source_class") or self.adaptation.get("energy_source")
                   or "none")

    @property
    def total_joules(self) -> float:
        return float(self.adaptation.get("total_joules") or self.adaptation.get("joules") or 0.0)


def _cache_key(base: Path, seed: int, steps: int) -> str:
    digest = hashlib.sha256(str(base.resolve()).encode()).hexdigest()[:10]
    return f"{base.name}-{digest}-lora-rag-seed{seed}-steps{steps}-v{CACHE_VERSION}"


def ensure_adapted(base: Path, cache_root: Path, console: Any, *, seed: int = 0,
                   steps: int = ADAPT_STEPS, device: str = "auto") -> tuple[Path, Path]:
    """The cached merged model and adaptation.json for ``base``; adapts once when missing."""
    d = cache_root / "demo" / _cache_key(base, seed, steps)
    if demo_cache.is_complete(d):
        console.print(f"[dim]adapted model: {d} (cached)[/dim]")
        return d / "merged", d / "adaptation.json"
    demo_cache.build(d, lambda tmp: [
        sys.executable, "-m", "edge_eval", "adapt", str(base), "--method", "lora", "--task", "rag",
        "--data", "builtin:rag", "--steps", str(steps), "--seed", str(seed), "--out", str(tmp),
        "--merge", "--device", device, "--quiet"],
        f"first run: LoRA-adapting the model on builtin:rag ({steps} steps, cached "
        "for later runs; --paper-constants skips this) ...", "edge-eval adapt", console)
    console.print(f"[dim]adapted model: {d} (adapted now)[/dim]")
    return d / "merged", d / "adaptation.json"


UNQUANTIZED = ("none", "fp16", "bf16")


def ensure_reference(merged: Path, name: str, device: str, console: Any) -> Path:
    """The cached ``results.json`` of the adapted model evaluated unquantized under ``name``."""
    d = merged.parent / f"reference-{name}-n{EVAL_LIMIT}-t{EVAL_MAX_TOKENS}"
    if not demo_cache.is_complete(d):
        demo_cache.build(d, lambda tmp: [
            sys.executable, "-m", "edge_proxy.demo.reference", str(merged), str(tmp), "--model", name,
            "--device", device, "--limit", str(EVAL_LIMIT), "--max-tokens", str(EVAL_MAX_TOKENS)],
            f"first run: evaluating the adapted model unquantized, Q_ret's reference ({EVAL_LIMIT} "
            "held-out rag items, cached) ...", "the reference evaluation", console)
    return d / "run" / "results.json"


def prepare(args: argparse.Namespace, base: Path, work: Path, console: Any,
            served_name: str) -> MeasuredInputs:
    """Adapt (or reuse the cached adaptation of) ``base``, and when the demo serves it quantized,
    evaluate (or reuse) its unquantized reference; the runs directory is under ``work``."""
    cache = demo_cache.cache_root(args)
    merged, adaptation_path = ensure_adapted(base, cache, console, device=args.device)
    try:
        adaptation = json.loads(adaptation_path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{adaptation_path}: unreadable ({e}); delete {adaptation_path.parent}") from None
    runs = work / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    reference = None
    if args.quantization not in UNQUANTIZED:
        reference = f"{served_name}-reference"
        results = ensure_reference(merged, reference, args.device, console)
        (runs / "reference").mkdir()
        shutil.copyfile(results, runs / "reference" / "results.json")
    return MeasuredInputs(merged, adaptation_path, adaptation, runs, reference, args.quantization)


def run_eval(inputs: MeasuredInputs, base_url: str, metrics_base_url: str, token: str, model: str,
             console: Any) -> dict[str, Any]:
    """``edge-eval eval`` of held-out builtin:rag items through the proxy; returns the summary."""
    out = inputs.runs_dir / "served"
    cmd = [sys.executable, "-m", "edge_eval", "eval", "--endpoint", base_url, "--model", model,
           "--task", "rag", "--data", "builtin:rag:test", "--limit", str(EVAL_LIMIT),
           "--max-tokens", str(EVAL_MAX_TOKENS), "--out", str(out), "--lookup-url", metrics_base_url,
           "--quiet"]
    if inputs.reference_model:
        cmd += ["--reference-model", inputs.reference_model]
    env = {**os.environ, "EDGE_EVAL_LOOKUP_TOKEN": token}
    with console.status(f"evaluating the served model through the proxy ({EVAL_LIMIT} held-out rag "
                        "items, edge-eval eval) ..."):
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    if r.returncode != 0:
        last = (r.stderr.strip().splitlines() or ["unknown error"])[-1]
        raise ConfigError(f"edge-eval eval failed: {last}")
    summary = json.loads((out / "results.json").read_text())["summary"]
    console.print(f"evaluated: token F1 {summary['mean_score']:.3f} on {EVAL_LIMIT} held-out rag items "
                  f"(results: {out / 'results.json'})")
    return summary


def sources(inputs: MeasuredInputs, m: dict[str, list[tuple[dict[str, str], float]]], model: str,
            e_kind: str) -> dict[str, str]:
    """The table's source column for the rows whose inputs are measured here."""
    def label(name: str) -> str:
        for lab, _ in m.get(name, []):
            if lab.get("model") == model and lab.get("source"):
                return lab["source"]
        return "pending"

    kj = inputs.total_joules / 1e3
    ipw = label("edge_proxy_intelligence_per_joule")
    score = ("score measured (edge-eval eval, token F1)" if ipw not in ("none", "pending")
             else "score not read yet (edge-eval eval results)")
    return {
        "N_break": f"{label('edge_proxy_break_even_requests')}: energy {e_kind}; adaptation "
                   f"{kj:,.1f} kJ {inputs.energy_source} (edge-eval adapt); prices configured",
        "IPW": f"{ipw}: {score}; J {e_kind}",
        "Q_ret": (f"{label('edge_proxy_quantization_fidelity_percent')}: both scores measured "
                  f"(edge-eval eval: {inputs.quantization} vs unquantized, same items)"
                  if inputs.reference_model else
                  "n/a: served unquantized, its own reference (--quantization int4 measures Q_ret)"),
    }
