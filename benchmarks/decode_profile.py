"""What bounds a decode step of the fast engine: kernel time vs launch gaps vs host, merged projections
on and off, side by side in one run (issue 17).

For each quantization and each ``--variants`` entry (``merge-off``/``merge-on``: merged projections off
first, since merging rewires the model's weights into views of the merged ones; ``served``: the engine's
defaults; ``pick-eager``: those with the greedy pick as eager ops, not the two kernels; ``rope-kv-off``/``-on``:
decode's rotary and K/V writes as separate ops or one kernel, merged on), on one loaded model:

* the captured decode graph replayed alone at batch 1, 8 and 64 (CUDA events, median of 50): device
  time per step with no host work;
* ``torch.profiler`` over 5 replays of that graph and 5 eager steps: kernels per step, summed kernel
  time per step, the top 40 kernels; ``graph ms - kernel ms`` is the time the device spends between
  kernels inside the graph (launch gaps);
* ITL at concurrency 1 in-process (one request of ``--new-tokens``): graph time + host loop.

Writes ``--out/decode_profile.json`` and a markdown table on stdout. CPU smoke (no graphs, no CUDA
kernels, only the plumbing): ``python benchmarks/decode_profile.py --preset tiny --out /tmp/dp``.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from model_server_process import synth_model  # noqa: E402
from graph_step import graph_step_ms  # noqa: E402
from support import default_commit, log, utc_date  # noqa: E402


def kernel_profile(fn, steps: int = 5) -> dict:
    """Kernels per step and summed kernel time per step (ms) while ``fn`` runs ``steps`` times, and the host ops with
    the most self time per step."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    fn()
    with profile(activities=acts) as prof:
        for _ in range(steps):
            fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    kernels, host = [], []
    for e in prof.key_averages():
        if str(getattr(e, "device_type", "")).endswith("CUDA"):
            us = float(getattr(e, "device_time_total", 0.0) or getattr(e, "cuda_time_total", 0.0) or 0.0)
            kernels.append((e.key, e.count, us))
        else:
            host.append((e.key, e.count, float(getattr(e, "self_cpu_time_total", 0.0) or 0.0)))
    kernels.sort(key=lambda k: -k[2])
    host.sort(key=lambda k: -k[2])
    return {"kernels_per_step": round(sum(k[1] for k in kernels) / steps, 1),
            "kernel_ms_per_step": round(sum(k[2] for k in kernels) / steps / 1e3, 4),
            "top": [{"kernel": k[0][:90], "per_step": round(k[1] / steps, 1), "us_per_step": round(k[2] / steps, 1)}
                    for k in kernels[:40]],
            # host side: the ops and CUDA runtime calls (cudaMalloc, cudaFree, synchronizes) with the most self time
            "host_top": [{"op": k[0][:90], "per_step": round(k[1] / steps, 1), "self_us_per_step": round(k[2] / steps, 1)}
                         for k in host[:25]]}


async def itl_c1(eng, prompt: list[int], new_tokens: int) -> tuple[float, list[int]]:
    """Median inter-token gap (ms) of the second of two greedy requests, and its tokens."""
    from model_server.engines.base import GenerationRequest, SamplingParams

    gaps, last, toks = [], None, []
    for rep in range(2):
        async for ev in eng.submit(GenerationRequest(f"itl{rep}", prompt, SamplingParams(max_new_tokens=new_tokens,
                                                                                         ignore_eos=True))):
            now = time.monotonic()
            if ev.token_id is not None and last is not None and rep == 1:
                gaps.append(now - last)
            if ev.token_id is not None and rep == 1:
                toks.append(ev.token_id)
            last = now
        last = None
    return round(statistics.median(gaps) * 1e3, 4), toks


# variant -> the fast engine's keyword arguments (merge-off first: merging rewires the model's weights)
VARIANTS = {"merge-off": dict(merge_projections=False, rope_kv=False), "merge-on": dict(rope_kv=False),
            "rope-kv-off": dict(rope_kv=False), "rope-kv-on": dict(rope_kv=None),
            "attn-sdpa": dict(rope_kv=None, decode_attn=False), "attn-triton": dict(rope_kv=None, decode_attn=True),
            "pick-eager": dict(pick_kernel=False), "served": dict()}


def attn_check(r, b: int, length: int) -> dict:
    """Max |error| against SDPA in fp32 on random q/K/V of the runner's shapes (``b`` rows), of the kernel and,
    for scale, of SDPA itself in the model's dtype (what the engine ran before)."""
    from model_server.engines.fast.decode_attn import decode_attention, sdpa_reference

    g = torch.Generator(device=r.device).manual_seed(0)
    shape = (b, r.n_kv, length, r.head_dim)
    q = torch.randn(b, r.n_kv, r.group, r.head_dim, generator=g, device=r.device).to(r.dtype)
    kc = torch.randn(shape, generator=g, device=r.device).to(r.dtype)
    vc = torch.randn(shape, generator=g, device=r.device).to(r.dtype)
    pos = torch.randint(0, length, (b,), generator=g, device=r.device)
    ref = sdpa_reference(q, kc, vc, pos, length, r.scaling)
    own = decode_attention(q, kc, vc, pos, length, r.scaling).float()
    sdpa = sdpa_reference(q, kc, vc, pos, length, r.scaling, r.dtype)
    return {"kernel": float((own - ref).abs().max()), "sdpa_in_model_dtype": float((sdpa.float() - ref).abs().max())}


async def batch_greedy(eng, n: int, prompt_len: int, new_tokens: int) -> list[list[int]]:
    """Tokens of ``n`` concurrent greedy requests (distinct prompts, same lengths: decode steps of ``n`` rows)."""
    from model_server.engines.base import GenerationRequest, SamplingParams

    async def one(i: int) -> list[int]:
        prompt = [300 + (i * 7 + j) % 5000 for j in range(prompt_len)]
        params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
        toks = []
        async for ev in eng.submit(GenerationRequest(f"batch{i}", prompt, params)):
            if ev.token_id is not None:
                toks.append(ev.token_id)
        return toks
    return list(await asyncio.gather(*(one(i) for i in range(n))))


def measure(loaded, variant: str, args) -> dict:
    from model_server import int4_mma_glu
    from model_server.engines.fast import from_loaded

    kw = VARIANTS[variant]
    eng = from_loaded(loaded, max_batch=max(args.batches), max_total_tokens=args.prompt_len + args.new_tokens + 8,
                      lazy_graphs=True, **kw)
    r = eng.runner
    length = next(b for b in r.length_buckets if b >= args.prompt_len + args.new_tokens)
    res: dict = {"variant": variant, "merge_projections": kw.get("merge_projections", True),
                 "rope_kv": bool(r.rope_kv), "decode_attn": bool(r.decode_attn), "length_bucket": length}

    async def main():
        t = time.monotonic()
        await eng.start()
        res["start_seconds"] = round(time.monotonic() - t, 2)
        res["merged_projections"] = eng.stats().extra["merged_projections"]
        res["itl_c1_ms"], res["greedy_tokens"] = await itl_c1(eng, list(range(300, 300 + args.prompt_len)),
                                                              args.new_tokens)
        if args.batch_greedy:
            res["greedy_batch_tokens"] = await batch_greedy(eng, args.batch_greedy, args.prompt_len, args.new_tokens)
        # graphs as served: captured once the background warm-up has switched the engine to its fused path (its
        # compiled ops, and the first-use checks of INT4 kernels, e.g. the mma GLU epilogue's)
        res["warm_applied"] = await eng.wait_warm(600)
        res["mma_glu_ready"] = int4_mma_glu.serves(r.device) if getattr(loaded.model, "int4_kernel", None) else None
        with torch.inference_mode():
            for b in args.batches:
                r.decode(b, length)         # lazy graphs: this bucket's first step captures its graph
                res[f"graph_ms_b{b}"] = await asyncio.to_thread(graph_step_ms, eng, b, length, r.device.type)
                res[f"graph_profile_b{b}"] = await asyncio.to_thread(kernel_profile, lambda b=b: r.decode(b, length))
                res[f"eager_profile_b{b}"] = await asyncio.to_thread(
                    kernel_profile, lambda b=b: r.decode_forward(b, length))
                if r.decode_attn:
                    res[f"attn_max_abs_err_vs_fp32_b{b}"] = await asyncio.to_thread(attn_check, r, b, length)
                g, k = res[f"graph_ms_b{b}"], res[f"graph_profile_b{b}"]["kernel_ms_per_step"]
                if g is not None:
                    res[f"gap_ms_b{b}"] = round(g - k, 4)
        await eng.stop(drain=False, timeout_s=5)
    asyncio.run(main())
    res["pick_kernel"], res["pick_kernel_error"] = bool(r.picker.on), r.picker.error   # after its first-use check
    del eng
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="llama-3.2-1b")
    ap.add_argument("--model-dir", default=None, help="use this model directory instead of synthesizing one")
    ap.add_argument("--out", required=True)
    ap.add_argument("--quants", default="bf16,int4")
    ap.add_argument("--batches", default="1,8,64")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--variants", default="merge-off,merge-on", help=f"of {', '.join(VARIANTS)}")
    ap.add_argument("--batch-greedy", type=int, default=0,
                    help="also record the tokens of this many concurrent greedy requests (0: none)")
    ap.add_argument("--commit", default=default_commit())
    args = ap.parse_args(argv)
    bad = [v for v in args.variants.split(",") if v not in VARIANTS]
    if bad:
        ap.error(f"unknown variant(s) {', '.join(bad)}; choose from {', '.join(VARIANTS)}")
    args.batches = [int(x) for x in args.batches.split(",") if x]
    from model_server.loading import load_model

    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = Path(args.model_dir) if args.model_dir else synth_model(args.preset, Path(tempfile.mkdtemp()), 0)
    report = {"card": torch.cuda.get_device_name() if device == "cuda" else "cpu", "date": utc_date("%Y-%m-%d %H:%M"),
              "commit": args.commit, "command": "python benchmarks/decode_profile.py " + " ".join(sys.argv[1:]),
              "torch": torch.__version__, "rows": []}
    for q in args.quants.split(","):
        loaded = load_model(str(model_dir), device, q)
        for variant in args.variants.split(","):
            try:
                row = {"quant": q, **measure(loaded, variant, args)}
            except Exception as exc:  # noqa: BLE001 - record and go on
                row = {"quant": q, "variant": variant, "error": f"{type(exc).__name__}: {exc}"[:400]}
            report["rows"].append(row)
            first = next(r for r in report["rows"] if r["quant"] == q)
            if "greedy_tokens" in row and "greedy_tokens" in first:
                row["greedy_same_as_first_variant"] = row["greedy_tokens"] == first["greedy_tokens"]
                # tokens before the first difference (random weights have near-ties: a rounding change flips one)
                row["greedy_common_prefix"] = next((i for i, (a, b) in enumerate(zip(row["greedy_tokens"],
                                                    first["greedy_tokens"])) if a != b), len(row["greedy_tokens"]))
            (out / "decode_profile.json").write_text(json.dumps(report, indent=1))
            log(f"{q} {variant}: " + ", ".join(f"{k} {v}" for k, v in row.items() if not isinstance(v, (dict, list))))
        del loaded
        if device == "cuda":
            torch.cuda.empty_cache()
    print("| quant | variant | ITL c=1 ms | " + " | ".join(f"b={b}: graph ms / kernels / kernel ms / gap ms"
                                                      for b in args.batches) + " |")
    print("|---|---|---|" + "---|" * len(args.batches))
    for r in report["rows"]:
        cells = [f"{r.get(f'graph_ms_b{b}')} / {r.get(f'graph_profile_b{b}', {}).get('kernels_per_step')} / "
                 f"{r.get(f'graph_profile_b{b}', {}).get('kernel_ms_per_step')} / {r.get(f'gap_ms_b{b}')}"
                 for b in args.batches]
        print(f"| {r['quant']} | {r['variant']} | {r.get('itl_c1_ms')} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
