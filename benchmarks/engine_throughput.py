"""Fast engine vs transformers' continuous batching, side by side in one run, on one card.

What it does (each step's results are written to ``--out`` as soon as they exist):

1. Builds the model with ``model-server synth`` (``--preset llama-3.2-1b`` on the GPU; ``tiny`` on CPU).
2. For each quantization (``bf16``, ``nf4``): loads it through ``model_server.loading.load_model``
   (weight bytes measured from the tensors as loaded), then
   a. greedy identity: ``model.generate`` one prompt at a time vs the fast engine with all prompts in
      one batch; where they differ, the step, and the gap between transformers' two best logits there
      (a gap at or under the dtype's rounding step means a near-tie that any change of kernel or
      batch shape may flip);
   b. throughput cells for each engine: prompt lengths x concurrency levels, closed loop (``c``
      requests in flight, a new one submitted when one finishes): aggregate output tokens/s, TTFT
      p50/p99, ITL p50/p99 (per token, at the consumer), J/token from the NVML energy counter (whole
      cell, prefill included), peak GPU memory; and the memory-bandwidth limit of that cell:
      ``c / ((weight_bytes + c * mean_context * kv_bytes_per_token) / measured_copy_bandwidth)``;
   c. memory check (fast engine): ``--memory-requests`` requests at concurrency ``max_batch``;
      allocated/reserved memory before and after must not grow.
3. Prints one markdown table and writes ``engine_throughput.json`` / ``engine_throughput.md``.

CPU smoke run (seconds):  python benchmarks/engine_throughput.py --preset tiny --out /tmp/et
GPU run (device tool):    python benchmarks/engine_throughput.py --preset llama-3.2-1b --out $OUT

Its cells are ~1 s (a prefill burst plus decode); throughput figures to quote come from
``benchmarks/steady_state.py`` (3 x 10 s steady-state windows, median and spread).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine_cells import run_cells  # noqa: E402
from engine_identity import greedy_identity  # noqa: E402
from engine_measure import Energy, copy_bandwidth_bytes_per_s, free_memory  # noqa: E402
from support import T0, log, utc_date  # noqa: E402


def markdown(report: dict) -> str:
    lines = [f"card: {report['card']} · date: {report['date']} · preset: {report['preset']} · "
             f"copy bandwidth: {report.get('copy_bandwidth_gb_per_s')} GB/s · command: `{report['command']}`", ""]
    for q in report["quants"]:
        lines.append(f"- {q['quant']}: weight bytes {q.get('weight_bytes')}, identity: {json.dumps(q.get('identity'))}")
        if q.get("identity_fp32"):
            lines.append(f"- fp32 (same weights upcast): identity: {json.dumps(q['identity_fp32'])}")
    lines += ["", "| engine | quant | prompt | conc | tok/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms "
              "| J/token | peak alloc GB | BW limit tok/s | % of limit | rho_sys tok/s/GB |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        if "tokens_per_second" not in r:
            continue
        pa = r.get("gpu_peak_allocated_bytes")
        frac = r.get("fraction_of_bandwidth_limit")
        lines.append(
            f"| {r['engine']} | {r['quant']} | {r['prompt_len']} | {r['concurrency']} | {r['tokens_per_second']:.0f} "
            f"| {r['ttft_p50_ms']} | {r['ttft_p99_ms']} | {r['itl_p50_ms']} | {r['itl_p99_ms']} "
            f"| {r.get('joules_per_token')} | {'' if pa is None else round(pa / 1e9, 2)} "
            f"| {r.get('bandwidth_limit_tokens_per_second', '')} | {'' if frac is None else round(100 * frac, 1)} "
            f"| {r['rho_sys_tokens_per_s_per_gb']} |")
    # side-by-side ratios
    idx = {(r["engine"], r["quant"], r["prompt_len"], r["concurrency"]): r for r in report["results"]
           if "tokens_per_second" in r}
    ratios = []
    for (e, q, p, c), r in idx.items():
        b = idx.get(("transformers", q, p, c))
        if e == "fast" and b:
            ratios.append(f"| {q} | {p} | {c} | {r['tokens_per_second'] / b['tokens_per_second']:.1f}x |")
    if ratios:
        lines += ["", "| quant | prompt | conc | fast / transformers tok/s |", "|---|---|---|---|", *ratios]
    for r in report["results"]:
        if r.get("memory_check") or r.get("error") or r.get("skipped") or r.get("engine_extra"):
            lines.append(f"- {json.dumps(r)}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="tiny", help="synth preset (tiny | llama-3.2-1b | ...)")
    ap.add_argument("--model-dir", default=None, help="use this model directory instead of synthesizing")
    ap.add_argument("--out", required=True, help="directory for engine_throughput.json/.md")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--quants", default=None, help="comma list: bf16,nf4 (default: bf16,nf4 on CUDA, none on CPU)")
    ap.add_argument("--engines", default="fast,fast-nofuse,fast-eager,transformers",
                    help="fast (CUDA graphs + fused ops), fast-nofuse (graphs, no torch.compile), "
                         "fast-eager (neither), transformers (its continuous batching)")
    ap.add_argument("--fp32-identity", type=int, default=4,
                    help="CUDA: also check greedy identity in fp32 on this many prompts (0: skip)")
    ap.add_argument("--prompt-lens", default=None, help="comma list (default 64,512; tiny: 16,64)")
    ap.add_argument("--concurrency", default=None, help="comma list (default 1,8,64,256; tiny: 1,4,16)")
    ap.add_argument("--new-tokens", type=int, default=None, help="default 128 (tiny: 16)")
    ap.add_argument("--max-batch", type=int, default=None, help="fast engine slots (default: max concurrency)")
    ap.add_argument("--waves", type=int, default=2, help="fast engine: requests per cell = waves x concurrency")
    ap.add_argument("--min-requests", type=int, default=16)
    ap.add_argument("--baseline-nf4-concurrency", default="64", help="transformers NF4 cells (first prompt length)")
    ap.add_argument("--eager-concurrency", default="1,64",
                    help="fast-eager (graphs off) cells, first prompt length only")
    ap.add_argument("--identity-prompts", type=int, default=8)
    ap.add_argument("--identity-new-tokens", type=int, default=None, help="default 64 (tiny: 16)")
    ap.add_argument("--memory-requests", type=int, default=1000)
    ap.add_argument("--memory-new-tokens", type=int, default=64)
    ap.add_argument("--deadline-s", type=float, default=500.0, help="skip remaining cells after this many seconds")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    from model_server.loading import LoadError, load_model, resolve_device
    from model_server.synth import SynthError, synthesize

    try:
        device = resolve_device(args.device)
    except LoadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    tiny = args.preset == "tiny"
    ints = lambda s: [int(x) for x in s.split(",") if x.strip()]  # noqa: E731
    args.prompt_lens = ints(args.prompt_lens or ("16,64" if tiny else "64,512"))
    args.concurrency = ints(args.concurrency or ("1,4,16" if tiny else "1,8,64,256"))
    args.new_tokens = args.new_tokens or (16 if tiny else 128)
    args.identity_new_tokens = args.identity_new_tokens or (16 if tiny else 64)
    args.max_batch = args.max_batch or max(args.concurrency)
    args.baseline_nf4_concurrency = ints(args.baseline_nf4_concurrency)
    args.eager_concurrency = ints(args.eager_concurrency)
    if tiny and args.memory_requests == 1000:
        args.memory_requests = 100
    quants = (args.quants or ("bf16,nf4" if device == "cuda" else "none")).split(",")
    engines = args.engines.split(",")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    energy = Energy()
    report = {"card": energy.name() if device == "cuda" else "cpu", "device": device,
              "date": utc_date("%Y-%m-%d %H:%M UTC"), "preset": args.preset,
              "command": " ".join([Path(sys.argv[0]).as_posix(), *(argv if argv is not None else sys.argv[1:])]),
              "torch": torch.__version__, "quants": [], "results": []}
    try:
        import transformers

        report["transformers"] = transformers.__version__
    except Exception:
        pass

    def write() -> None:
        (out / "engine_throughput.json").write_text(json.dumps(report, indent=2) + "\n")
        (out / "engine_throughput.md").write_text(markdown(report))

    bw = copy_bandwidth_bytes_per_s(device)
    report["copy_bandwidth_gb_per_s"] = None if bw is None else round(bw / 1e9, 1)
    log(f"device {report['card']}, copy bandwidth {report['copy_bandwidth_gb_per_s']} GB/s")
    model_dir = args.model_dir
    if model_dir is None:
        model_dir = os.path.join(tempfile.mkdtemp(prefix="et-"), args.preset)
        try:
            synthesize(model_dir, args.preset, seed=args.seed, show_progress=False)
        except SynthError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        log(f"synthesized {args.preset} at {model_dir}")

    for quant in quants:
        q = {"quant": quant}
        report["quants"].append(q)
        try:
            loaded = load_model(model_dir, device, quant)
        except Exception as exc:
            q["error"] = f"{type(exc).__name__}: {exc}"
            log(f"{quant}: load failed: {exc}")
            write()
            continue
        q.update(weight_bytes=loaded.weight_bytes, dtype=loaded.dtype, parameters=loaded.parameters)
        log(f"{quant}: loaded, weight bytes {loaded.weight_bytes}")
        if args.identity_prompts > 0 and "fast" in engines and not q.get("skip_identity"):
            try:
                q["identity"] = greedy_identity(loaded, args.identity_prompts, args.identity_new_tokens,
                                                max(args.prompt_lens), device, args.seed)
            except Exception as exc:
                traceback.print_exc()
                q["identity"] = {"error": f"{type(exc).__name__}: {exc}"}
            log(f"{quant}: identity {json.dumps(q['identity'])}")
            free_memory(device)
            if device == "cuda" and quant == "bf16" and args.fp32_identity > 0:
                import dataclasses

                try:
                    m32 = copy.deepcopy(loaded.model).float()
                    q["identity_fp32"] = greedy_identity(dataclasses.replace(loaded, model=m32), args.fp32_identity,
                                                         min(32, args.identity_new_tokens), max(args.prompt_lens),
                                                         device, args.seed + 1)
                    del m32
                except Exception as exc:
                    traceback.print_exc()
                    q["identity_fp32"] = {"error": f"{type(exc).__name__}: {exc}"}
                log(f"fp32: identity {json.dumps(q['identity_fp32'])}")
                free_memory(device)
        write()
        for kind in engines:   # fast first: transformers' batching may switch the attention implementation
            run_cells(kind, loaded, args, device, energy, bw, quant, report["results"], write)
        del loaded
        free_memory(device)
    report["total_seconds"] = round(time.monotonic() - T0, 1)
    write()
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
