"""How long the fast engine takes to prefill a burst of prompts that arrive together, per quantization (issue 17).

In the in-process steady state at 64 streams every stream asks for the same number of tokens, so the 64 finish in the
same step and resubmit together: each wave of 128 decode steps starts with a burst of 64 prompts to prefill, and the
decode batch waits for it. This measures that wait alone: for each ``--bursts`` size ``n`` (default 1, 8, 32, 64),
``n`` prompts of ``--prompt-len`` tokens submitted at once with one new token each; the time from the submit to the
last first token (wall clock: host and device), median and range over ``--reps`` bursts after ``--warm`` unmeasured
ones, and the engine's prefill passes per burst. With ``--profile`` also ``torch.profiler`` over one burst of the
largest size: kernels and summed kernel time, the top 25 kernels (does the device or the host bound it?).

  python benchmarks/prefill_burst.py --model-dir /tmp/m1b --quants bf16,int4 --out DIR     # GPU
  python benchmarks/prefill_burst.py --preset tiny --quants bf16 --bursts 1,4 --reps 2 --out DIR   # CPU smoke

Writes ``DIR/prefill_burst.json`` (card, date, command, commit) and a table on stdout.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from decode_profile import kernel_profile  # noqa: E402
from model_server_process import synth_model  # noqa: E402
from support import default_commit, log, utc_date  # noqa: E402


async def burst(eng, prompts: list[list[int]], tag: str) -> float:
    """Seconds from submitting ``prompts`` together (one new token each) to the last first token."""
    from model_server.engines.base import GenerationRequest, SamplingParams

    async def one(i: int, p: list[int]) -> None:
        req = GenerationRequest(f"{tag}-{i}", p, SamplingParams(max_new_tokens=1, ignore_eos=True))
        async for _ in eng.submit(req):
            pass
    t = time.monotonic()
    await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
    return time.monotonic() - t


def run_quant(q: str, args: argparse.Namespace, model_dir: Path, device: str) -> dict:
    from model_server.engines.fast import from_loaded
    from model_server.loading import load_model

    quant, _, kernels = q.partition(":")
    if kernels:
        os.environ["MODEL_SERVER_INT4_KERNELS"] = kernels
    else:
        os.environ.pop("MODEL_SERVER_INT4_KERNELS", None)
    loaded = load_model(str(model_dir), device, quant)
    top = max(args.bursts)
    eng = from_loaded(loaded, max_batch=top, max_total_tokens=args.prompt_len + 136)   # as steady_state.py's
    rng = random.Random(args.seed)
    vocab = len(loaded.tokenizer)
    entry: dict = {"quant": q, "cells": []}

    def prompts(n: int) -> list[list[int]]:
        return [[rng.randrange(300, min(vocab, 8000)) for _ in range(args.prompt_len)] for _ in range(n)]

    async def main() -> None:
        await eng.start()
        await eng.wait_warm(600)
        for n in args.bursts:
            times, passes = [], []
            for rep in range(args.warm + args.reps):
                before = eng.stats().prefill_calls_total
                s = await burst(eng, prompts(n), f"b{n}r{rep}")
                if rep >= args.warm:
                    times.append(s * 1e3)
                    passes.append(eng.stats().prefill_calls_total - before)
            cell = {"prompts": n, "tokens": n * args.prompt_len, "ms_median": round(statistics.median(times), 3),
                    "ms_min": round(min(times), 3), "ms_max": round(max(times), 3),
                    "prefill_passes_median": statistics.median(passes)}
            entry["cells"].append(cell)
            log(f"{q} burst {n} x {args.prompt_len}: {cell['ms_median']} ms [{cell['ms_min']}..{cell['ms_max']}], "
                f"{cell['prefill_passes_median']} prefill passes")
        if args.profile:                     # profiled from a worker thread; each burst runs on this loop
            batch, loop = prompts(top), asyncio.get_running_loop()
            entry["profile"] = await asyncio.to_thread(kernel_profile, lambda: asyncio.run_coroutine_threadsafe(
                burst(eng, batch, f"prof{time.monotonic_ns()}"), loop).result(), 1)
        await eng.stop(drain=False, timeout_s=5)

    asyncio.run(main())
    return entry


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--model-dir", default=None, help="a model directory (default: synthesize --preset)")
    ap.add_argument("--preset", default="llama-3.2-1b")
    ap.add_argument("--quants", default="bf16,int4", help="comma-separated; int4:KERNELS sets MODEL_SERVER_INT4_KERNELS")
    ap.add_argument("--bursts", default="1,8,32,64", help="prompts per burst (comma-separated)")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--warm", type=int, default=2, help="unmeasured bursts per size first")
    ap.add_argument("--profile", action="store_true", help="torch.profiler over one burst of the largest size")
    ap.add_argument("--commit", default=default_commit())
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        args.bursts = [int(x) for x in args.bursts.split(",") if x]
    except ValueError:
        ap.error("--bursts takes comma-separated integers")
    if not args.bursts or min(args.bursts) < 1 or args.reps < 1 or args.warm < 0 or args.prompt_len < 1:
        ap.error("--bursts, --reps and --prompt-len need positive values, --warm >= 0")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = Path(args.model_dir) if args.model_dir else synth_model(args.preset, Path(tempfile.mkdtemp()), 0)
    report = {"card": torch.cuda.get_device_name(0) if device == "cuda" else "cpu", "date": utc_date(),
              "commit": args.commit, "command": "python benchmarks/prefill_burst.py " + " ".join(sys.argv[1:]),
              "torch": torch.__version__, "prompt_len": args.prompt_len, "reps": args.reps, "quants": []}
    for q in args.quants.split(","):
        report["quants"].append(run_quant(q, args, model_dir, device))
        (out / "prefill_burst.json").write_text(json.dumps(report, indent=1))
    print("| quant | prompts | ms median [min..max] | prefill passes |\n|---|---:|---:|---:|")
    for e in report["quants"]:
        for c in e["cells"]:
            print(f"| {e['quant']} | {c['prompts']} | {c['ms_median']} [{c['ms_min']}..{c['ms_max']}] | "
                  f"{c['prefill_passes_median']} |")
        if "profile" in e:
            p = e["profile"]
            print(f"{e['quant']} profile: {p['kernels_per_step']} kernels, {p['kernel_ms_per_step']} ms of kernels; host: "
                  + ", ".join(f"{h['op']} {h['per_step']:g} x {h['self_us_per_step']:g} us" for h in p.get("host_top", [])[:8]))
            for k in p["top"][:25]:
                print(f"  {k['us_per_step']:9.1f} us {k['per_step']:6.1f} x {k['kernel']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
