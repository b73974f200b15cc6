"""LoRA vs QLoRA adaptation energy, side by side in one run (issue 13; the paper's "QLoRA anomaly").

For each compute dtype (bf16, fp16) and method (lora, qlora) it runs ``edge-eval adapt`` on one model
with the same task, data, seed, steps and batch size (so the same examples and tokens), and reads
each ``adaptation.json``: training joules and seconds (NVML on a GPU: ``measured``; else
``estimated``), tokens, peak GPU memory. Reported per run: J/step, s/step, J per 1k training
tokens, and per dtype the QLoRA/LoRA energy ratio (the paper reports up to 7.2x on a T4, where its
QLoRA ran in bf16, which a T4 emulates).

Writes ``adapt_energy.json`` and ``adapt_energy.md`` under ``--out``.
GPU: ``python benchmarks/adapt_energy.py --preset llama-3.2-1b --out OUT``;
CPU smoke: ``--preset tiny --device cpu --methods lora --dtypes fp32 --steps 4``.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from model_server_process import synth_model  # noqa: E402
from support import default_commit, log, utc_date  # noqa: E402


def run_one(model: Path, method: str, dtype: str, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """One ``edge-eval adapt`` run; its adaptation.json plus derived per-step figures (or its error)."""
    cmd = [sys.executable, "-m", "edge_eval", "adapt", str(model), "--method", method,
           "--task", args.task, "--steps", str(args.steps), "--batch-size", str(args.batch_size),
           "--limit", str(args.limit), "--out", str(out), "--device", args.device,
           "--seed", str(args.seed), "--quiet"]
    if dtype != "fp32":
        cmd += ["--compute-dtype", dtype]
    log(f"{method} {dtype}: {' '.join(cmd[3:])}")
    t0 = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    wall = time.monotonic() - t0
    row: dict[str, Any] = {"method": method, "compute_dtype": dtype, "wall_seconds": wall,
                           "returncode": proc.returncode}
    if proc.returncode != 0:
        row["error"] = (proc.stderr.strip().splitlines() or ["(no output)"])[-1][:400]
        log(f"  failed: {row['error']}")
        return row
    doc = json.loads((out / "adaptation.json").read_text())
    train = doc["phases"]["train"]
    steps = int(doc["steps"])
    row.update({
        "dtype": doc["dtype"], "base_quantization": doc["base_quantization"],
        "device_name": doc["device_name"], "energy_source": doc["energy_source"],
        "energy_source_class": doc["energy_source_class"], "steps": steps,
        "tokens": doc["tokens"], "train_joules": train["joules"], "train_seconds": train["seconds"],
        "joules_per_step": train["joules"] / steps, "seconds_per_step": train["seconds"] / steps,
        "joules_per_1k_tokens": 1000.0 * train["joules"] / doc["tokens"] if doc["tokens"] else None,
        "mean_watts": train["joules"] / train["seconds"] if train["seconds"] else None,
        "peak_gpu_memory_bytes": doc.get("peak_gpu_memory_bytes"),
        "first_loss": doc["first_loss"], "last_loss": doc["last_loss"],
    })
    log(f"  {row['joules_per_step']:.2f} J/step, {row['seconds_per_step'] * 1000:.0f} ms/step, "
        f"loss {row['first_loss']:.3f} -> {row['last_loss']:.3f}")
    return row


def ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per compute dtype: QLoRA / LoRA for energy, time and peak memory (same steps and tokens)."""
    out = []
    for dtype in dict.fromkeys(r["compute_dtype"] for r in rows):
        by = {r["method"]: r for r in rows if r["compute_dtype"] == dtype and "error" not in r}
        if "lora" in by and "qlora" in by:
            lo, q = by["lora"], by["qlora"]
            mem = (q["peak_gpu_memory_bytes"] / lo["peak_gpu_memory_bytes"]
                   if q.get("peak_gpu_memory_bytes") and lo.get("peak_gpu_memory_bytes") else None)
            out.append({"compute_dtype": dtype, "energy_ratio": q["train_joules"] / lo["train_joules"],
                        "time_ratio": q["train_seconds"] / lo["train_seconds"], "memory_ratio": mem,
                        "same_tokens": q["tokens"] == lo["tokens"]})
    return out


def markdown(doc: dict[str, Any]) -> str:
    lines = [f"# LoRA vs QLoRA adaptation energy ({doc['date']}, commit {doc['commit']})", "",
             f"Model `{doc['model']}`, task {doc['task']}, {doc['steps']} steps x batch {doc['batch_size']}, "
             f"card {doc['card']}.", "",
             "| method | compute dtype | J/step | ms/step | J per 1k tokens | mean W | peak GPU GiB | loss first -> last | energy source |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in doc["runs"]:
        if "error" in r:
            lines.append(f"| {r['method']} | {r['compute_dtype']} | failed: {r['error']} | | | | | | |")
            continue
        mem = f"{r['peak_gpu_memory_bytes'] / 2**30:.2f}" if r.get("peak_gpu_memory_bytes") else ""
        lines.append(f"| {r['method']} | {r['compute_dtype']} | {r['joules_per_step']:.2f} | "
                     f"{r['seconds_per_step'] * 1000:.1f} | {r['joules_per_1k_tokens']:.3f} | "
                     f"{r['mean_watts']:.0f} | {mem} | {r['first_loss']:.3f} -> {r['last_loss']:.3f} | "
                     f"{r['energy_source']} ({r['energy_source_class']}) |")
    if doc["ratios"]:
        lines += ["", "| compute dtype | QLoRA/LoRA energy | QLoRA/LoRA time | QLoRA/LoRA peak memory | same tokens |",
                  "|---|---|---|---|---|"]
        for q in doc["ratios"]:
            mem = f"{q['memory_ratio']:.2f}x" if q["memory_ratio"] else ""
            lines.append(f"| {q['compute_dtype']} | {q['energy_ratio']:.2f}x | {q['time_ratio']:.2f}x | {mem} | "
                         f"{q['same_tokens']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="llama-3.2-1b", help="model_server synth preset (default llama-3.2-1b)")
    ap.add_argument("--model-dir", default=None, help="use this model instead of synthesizing the preset")
    ap.add_argument("--task", default="rag")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--limit", type=int, default=2000, help="training items")
    ap.add_argument("--methods", default="lora,qlora")
    ap.add_argument("--dtypes", default="bf16,fp16", help="compute dtypes (fp32: CPU only)")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per run")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = Path(args.model_dir) if args.model_dir else synth_model(args.preset, out, args.seed)
    runs = []
    for dtype in args.dtypes.split(","):
        for method in args.methods.split(","):
            runs.append(run_one(model, method, dtype, args, out / f"{method}-{dtype}"))
    card = next((r["device_name"] for r in runs if "device_name" in r), "unknown")
    doc = {"date": utc_date(), "commit": default_commit(), "card": card, "model": str(model),
           "preset": None if args.model_dir else args.preset, "task": args.task, "steps": args.steps,
           "batch_size": args.batch_size, "seed": args.seed, "command": " ".join(sys.argv),
           "runs": runs, "ratios": ratios(runs)}
    (out / "adapt_energy.json").write_text(json.dumps(doc, indent=2) + "\n")
    (out / "adapt_energy.md").write_text(markdown(doc))
    print(markdown(doc))
    return 0 if all("error" not in r for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
