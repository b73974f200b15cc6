"""Prompts prefilled inside decode steps (``engines/fast/mixed.py``): what a step costs, and whether it agrees.

1. Device time, one loaded model: a decode step of ``--batch`` rows replayed alone (CUDA graph), the same
   step carrying s = 1, 2, 4 prompt segments of ``--prompt-len`` tokens (``mixed``), and a prefill pass of
   n = 1, 2, 4 prompts (its bucket's graph); CUDA events, median of ``--reps``. What an arrival costs the
   batch: ``mixed(s) - decode`` with prompts in the step, ``prefill(n)`` as a pass of its own. Also the
   largest difference between a mixed step's first (eager) run and its graph's replay on the same inputs.
2. Agreement, the same model: ``--long`` greedy requests decode while ``--short`` others arrive staggered
   (one every ``--every`` tokens of the long ones; the second of two rounds counts), once with prompts prefilled in decode steps and once with a prefill pass
   per arrival; the share of requests whose tokens are identical, and of tokens before the first
   difference (bf16 rounding differs between the two paths, so near-ties can flip on random weights).

Writes ``mixed_step.json`` and prints a table. Example (GPU): ``python benchmarks/mixed_step.py --model-dir
/tmp/m1b --out /tmp/ms``; on CPU ``--device cpu --preset tiny`` checks that it runs (no timings).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import tempfile
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model_server_process import synth_model  # noqa: E402
from support import default_commit, utc_date  # noqa: E402


def _time_ms(fn, reps: int, device: str) -> float | None:
    if device != "cuda":
        fn()
        return None
    times = []
    for i in range(reps + 5):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        if i >= 5:
            times.append(s.elapsed_time(e))
    return round(statistics.median(times), 4)


def step_costs(r, batch: int, prompt_len: int, reps: int, device: str, ids: tuple[int, int]) -> dict:
    """Decode, mixed and prefill device times on runner ``r`` (graphs captured on first use)."""
    from model_server.engines.fast.mixed import run_mixed

    mx = r.mixed
    rng = random.Random(0)
    r.in_ids[:batch] = torch.tensor([rng.randrange(*ids) for _ in range(batch)], device=r.device)
    pos = prompt_len + 32
    r.in_pos[:batch].fill_(pos)
    length = pos + 1
    out: dict = {"batch": batch, "prompt_len": prompt_len, "seg_tokens": mx.seg_tokens}
    for _ in range(2):                                   # first call eager + lazy capture
        r.decode(batch, length)
    out["decode_ms"] = _time_ms(lambda: r.decode(batch, length), reps, device)
    out["mixed_ms"], out["graph_vs_eager_max_abs"], out["prefill_ms"] = {}, {}, {}
    host = torch.zeros(mx.layout.size, dtype=torch.int64)
    for s in [x for x in (1, 2, 4) if x <= mx.max_segments]:
        prompts = [[rng.randrange(*ids) for _ in range(prompt_len)] for _ in range(s)]
        parts = [(batch + j if batch + j < r.max_batch else j, p[i:i + mx.seg_tokens], i)
                 for j, p in enumerate(prompts) for i in range(0, len(p), mx.seg_tokens)]
        if len(parts) > mx.max_segments:
            continue
        seg, need = mx.pack(host, parts)
        mx.buf[:mx.layout.size].copy_(host.to(r.device))
        first = run_mixed(r, batch, max(length, need), seg).float().clone()
        replay = run_mixed(r, batch, max(length, need), seg).float()
        out["graph_vs_eager_max_abs"][s] = round(float((first - replay).abs().max()), 6)
        out["mixed_ms"][s] = _time_ms(lambda: run_mixed(r, batch, max(length, need), seg), reps, device)
        slots = list(range(s))
        for _ in range(2):
            r.prefill(slots, prompts)
        out["prefill_ms"][s] = _time_ms(lambda: r.prefill(slots, prompts), reps, device)
    return out


async def agreement(make_engine, prompts_long, prompts_short, long_new: int, short_new: int,
                    every: int) -> tuple[list[list[int]], dict]:
    """Greedy tokens of ``prompts_long`` (decoding) and ``prompts_short`` (short ``i`` is submitted when the
    first long request has produced ``every * (i + 1)`` tokens, so each arrives while the others decode).
    The workload runs twice on one engine and the second round is returned (the first captures graphs)."""
    from model_server.engines.base import GenerationRequest, SamplingParams

    eng = make_engine()
    await eng.start()
    await eng.wait_warm()

    async def one(rid, p, n, on_token=None):
        toks = []
        async for ev in eng.submit(GenerationRequest(rid, p, SamplingParams(max_new_tokens=n, ignore_eos=True))):
            if ev.token_id is not None:
                toks.append(ev.token_id)
                if on_token is not None:
                    on_token(len(toks))
        return toks

    async def round_(tag: str) -> list[list[int]]:
        shorts: list[asyncio.Task] = []

        def trigger(n_tokens: int) -> None:
            while len(shorts) < len(prompts_short) and n_tokens >= every * (len(shorts) + 1):
                i = len(shorts)
                shorts.append(asyncio.ensure_future(one(f"{tag}s{i}", prompts_short[i], short_new)))
        longs = [one(f"{tag}l{i}", p, long_new, trigger if i == 0 else None) for i, p in enumerate(prompts_long)]
        res = await asyncio.gather(*longs)
        while len(shorts) < len(prompts_short):      # the long ones ended first: submit the rest now
            trigger(10 ** 9)
        return list(res) + list(await asyncio.gather(*shorts))
    try:
        await round_("w")
        before = eng.stats()
        res = await round_("m")
        st = eng.stats()
        return res, {"prefill_passes": st.prefill_calls_total - before.prefill_calls_total,
                     "prefills_in_decode_steps": st.extra["prefills_in_decode_steps"]
                     - before.extra["prefills_in_decode_steps"],
                     "mixed_graphs_captured": st.extra["mixed_graphs_captured"]}
    finally:
        await eng.stop()


def compare(a: list[list[int]], b: list[list[int]]) -> dict:
    same = sum(x == y for x, y in zip(a, b))
    prefix = 0
    for x, y in zip(a, b):
        k = 0
        while k < min(len(x), len(y)) and x[k] == y[k]:
            k += 1
        prefix += k
    total = sum(len(x) for x in a)
    return {"requests_identical": f"{same}/{len(a)}", "tokens_before_first_difference": round(prefix / total, 4)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", default="", help="model folder (default: synthesize --preset into a temp dir)")
    ap.add_argument("--preset", default="llama-3.2-1b")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quant", default="bf16")
    ap.add_argument("--batch", type=int, default=64, help="decode rows of the timed steps")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--long", type=int, default=8, help="requests decoding while the short ones arrive")
    ap.add_argument("--short", type=int, default=24)
    ap.add_argument("--every", type=int, default=4, help="a short request arrives every N tokens of the long ones")
    ap.add_argument("--commit", default=default_commit())
    ap.add_argument("--out", default="out/mixed_step")
    args = ap.parse_args(argv)
    from model_server.engines.fast import from_loaded
    from model_server.loading import load_model

    model_dir = args.model_dir or synth_model(args.preset, Path(tempfile.gettempdir()), 0)
    loaded = load_model(str(model_dir), args.device, args.quant)
    max_len = args.prompt_len + 128 + 8
    rng = random.Random(1)
    hi = min(len(loaded.tokenizer), 8000)
    lo = min(300, hi // 2)
    longs = [[rng.randrange(lo, hi) for _ in range(args.prompt_len)] for _ in range(args.long)]
    shorts = [[rng.randrange(lo, hi) for _ in range(rng.randint(8, args.prompt_len))] for _ in range(args.short)]
    report: dict = {"date": utc_date(), "commit": args.commit, "device": args.device, "quant": args.quant,
                    "card": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"}
    runs = {}
    for name, seg in (("mixed", 4), ("pass", 0)):
        t0 = time.monotonic()
        runs[name] = asyncio.run(agreement(
            lambda seg=seg: from_loaded(loaded, max_batch=max(args.batch + 4, args.long + args.short),
                                        max_total_tokens=max_len, mixed_segments=seg),
            longs, shorts, 128, 32, args.every))
        report[f"engine_{name}"] = dict(runs[name][1], seconds=round(time.monotonic() - t0, 2))
    report["agreement_mixed_vs_pass"] = compare(runs["mixed"][0], runs["pass"][0])
    eng = from_loaded(loaded, max_batch=args.batch + 4, max_total_tokens=max_len, mixed_segments=4)
    asyncio.run(eng.start())
    asyncio.run(eng.stop())
    with torch.inference_mode():
        report["steps"] = step_costs(eng.runner, args.batch, args.prompt_len, args.reps, args.device, (lo, hi))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "mixed_step.json").write_text(json.dumps(report, indent=2) + "\n")
    st = report["steps"]
    print(f"{report['card']} {report['quant']} batch {st['batch']}: decode {st['decode_ms']} ms")
    for s, ms in st["mixed_ms"].items():
        print(f"  + {s} prompt(s) of {args.prompt_len} in the step: {ms} ms; as a prefill pass: "
              f"{st['prefill_ms'].get(s)} ms; graph vs eager max |diff| {st['graph_vs_eager_max_abs'][s]}")
    print("agreement mixed vs pass:", report["agreement_mixed_vs_pass"], report["engine_mixed"], report["engine_pass"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
