"""benchmarks/cold_start_phases.py's report: the markdown table of its starts, the greedy-token agreement across
variants, ``cold_start_phases.json`` / ``.md`` and the servers' logs as one archive.

Owns rendering and writing what the benchmark measured; must not start or time anything.
"""
from __future__ import annotations

import json
import tarfile
from pathlib import Path


def table(report: dict) -> str:
    cols = ["imports_s", "to_listening_s", "to_torch_s", "torch_to_device_s", "device_to_load_s", "prefetch_s", "cuda_init_s",
            "read_s", "prewarm_s", "build_s", "load_s", "quantize_s", "warmup_s", "ready_to_first_token_s"]
    lines = ["| variant | quant | load path / tokenizer | transformers imported (first request / end) | "
             + " | ".join(c[:-2] for c in cols)
             + " | **spawn -> first token s** | first request s | ready -> compile s | compile s | spawn -> fused s"
             " | steady request s |",
             "|---" * (len(cols) + 10) + "|"]
    for r in report["runs"]:
        ph = r.get("phases") or {}
        lines.append(f"| {r['variant']} | {r['quantization']} | {r.get('load_path')} / {r.get('tokenizer')} | "
                     f"{r.get('transformers_after_first_request')} / {r.get('transformers_at_end')} | "
                     + " | ".join(str(ph.get(c, "")) for c in cols)
                     + f" | **{r.get('spawn_to_first_token_s', r.get('error', ''))}** | {r.get('first_request_s')} | "
                     f"{ph.get('ready_to_compile_s', '')} | {ph.get('compile_s', '')} | {r.get('spawn_to_fused_s')} | "
                     f"{r.get('second_request_s')} |")
    for f in report.get("seed_fills", []):
        lines.append(f"\nseed fill ({f.get('seed', f['quantization'])}): `model-server compile-cache fill` rc {f['rc']} in "
                     f"{f['seconds']} s: {f['stdout'] or f['stderr']}")
    for r in report["runs"]:
        if r.get("imports_top_s"):
            lines.append(f"\ntop imports of {r['variant']} (-X importtime, cumulative s): "
                         + ", ".join(f"{m} {t:.2f}" for m, t in r["imports_top_s"][:8]))
    modes = [f"{r['variant']} {r['bytecode']}" for r in report["runs"] if r.get("bytecode")]
    if modes:
        lines.append("\nbytecode of torch (/info bytecode_cache.mode): " + ", ".join(modes))
    copied = [f"{r['variant']} {r['seed_copied_files']}" for r in report["runs"] if r.get("seed_copied_files")]
    if copied:
        lines.append("\nfiles copied from the seed at start: " + ", ".join(copied))
    return "\n".join(lines) + "\n"


def pack_logs(logs: Path, out: Path) -> None:
    """The servers' logs as one ``cold_logs.tgz`` in ``out`` (rewritten after each run: a cut-off call keeps them)."""
    with tarfile.open(out / "cold_logs.tgz", "w:gz") as tar:
        for f in sorted(logs.glob("*.log")):
            tar.add(f, arcname=f.name)


def write_report(report: dict, out: Path) -> str:
    """Token agreement so far, then ``cold_start_phases.json`` and ``.md``; returns the markdown."""
    for q in ("bf16", "int4"):
        ok = [r for r in report["runs"] if r["quantization"] == q and "tokens" in r]
        report[f"first_request_tokens_identical_{q}"] = len({json.dumps(r["tokens"]) for r in ok}) <= 1
        report[f"steady_request_tokens_identical_{q}"] = len({json.dumps(r["steady_tokens"]) for r in ok
                                                              if r.get("steady_tokens") is not None}) <= 1
    (out / "cold_start_phases.json").write_text(json.dumps(report, indent=1))
    md = table(report) + "".join(f"\n{k}: {v}" for k, v in report.items() if k.endswith(("_bf16", "_int4"))) + "\n"
    (out / "cold_start_phases.md").write_text(f"{report['card']}, {report['date']}, commit {report['commit']}\n\n" + md)
    return md
