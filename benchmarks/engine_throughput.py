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
import asyncio
import copy
import gc
import json
import os
import random
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model_server.engines.base import GenerationRequest, SamplingParams  # noqa: E402

T0 = time.monotonic()


def log(msg: str) -> None:
    print(f"[{time.monotonic() - T0:7.1f}s] {msg}", flush=True)


# ---------------------------------------------------------------------------- measurement helpers
class Energy:
    """NVML total-energy counter of the device (millijoules); None when unavailable."""

    def __init__(self, device_index: int = 0) -> None:
        self.handle = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self.pynvml = pynvml
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(device_index)
            pynvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)
        except Exception:
            self.handle = None

    def millijoules(self) -> int | None:
        if self.handle is None:
            return None
        try:
            return int(self.pynvml.nvmlDeviceGetTotalEnergyConsumption(self.handle))
        except Exception:
            return None

    def used_bytes(self) -> int | None:
        if self.handle is None:
            return None
        try:
            return int(self.pynvml.nvmlDeviceGetMemoryInfo(self.handle).used)
        except Exception:
            return None

    def name(self) -> str:
        if self.handle is None:
            return "cpu"
        try:
            n = self.pynvml.nvmlDeviceGetName(self.handle)
            return n.decode() if isinstance(n, bytes) else str(n)
        except Exception:
            return "unknown"


def copy_bandwidth_bytes_per_s(device: str) -> float | None:
    """Device-to-device copy of 1 GiB, counting bytes read plus written (median of 10)."""
    if device != "cuda":
        return None
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    times = []
    for _ in range(10):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        b.copy_(a)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    del a, b
    torch.cuda.empty_cache()
    return 2 * (1 << 30) / statistics.median(times)


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    k = min(len(xs) - 1, max(0, int(round(q / 100 * (len(xs) - 1)))))
    return xs[k]


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------- one closed-loop cell
async def closed_loop(engine, prompts: list[list[int]], concurrency: int, new_tokens: int) -> dict:
    sem = asyncio.Semaphore(concurrency)
    ttft: list[float] = []
    itl: list[float] = []
    n_tokens = 0
    errors: list[str] = []
    reasons: dict[str, int] = {}

    async def one(i: int, prompt: list[int]) -> None:
        nonlocal n_tokens
        async with sem:
            t_sub = time.monotonic()
            last = None
            req = GenerationRequest(f"b{i}-{random.getrandbits(40)}", prompt,
                                    SamplingParams(max_new_tokens=new_tokens, ignore_eos=True),
                                    arrival_ns=time.monotonic_ns())
            async for ev in engine.submit(req):
                now = time.monotonic()
                if ev.token_id is not None:
                    n_tokens += 1
                    if last is None:
                        ttft.append(now - t_sub)
                    else:
                        itl.append(now - last)
                    last = now
                if ev.finish_reason is not None:
                    reasons[ev.finish_reason] = reasons.get(ev.finish_reason, 0) + 1
                    if ev.error:
                        errors.append(ev.error)

    t0 = time.monotonic()
    await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
    wall = time.monotonic() - t0
    return {"wall_seconds": wall, "output_tokens": n_tokens, "tokens_per_second": n_tokens / wall,
            "ttft_p50_ms": _ms(pct(ttft, 50)), "ttft_p99_ms": _ms(pct(ttft, 99)),
            "itl_p50_ms": _ms(pct(itl, 50)), "itl_p99_ms": _ms(pct(itl, 99)),
            "finish_reasons": reasons, "errors": errors[:3]}


def _ms(x: float | None) -> float | None:
    return None if x is None else round(x * 1e3, 3)


# ---------------------------------------------------------------------------- greedy identity
def greedy_identity(loaded, n_prompts: int, n_new: int, max_prompt: int, device: str, seed: int) -> dict:
    """model.generate (batch 1, each prompt alone) vs the fast engine (all prompts batched together)."""
    from model_server.engines.fast import FastEngine

    model = loaded.model
    vocab = len(loaded.tokenizer)
    rng = random.Random(seed)
    lens = sorted({max(1, int(max_prompt * f)) for f in (0.02, 0.1, 0.25, 0.5, 0.75, 1.0)})
    prompts = [[rng.randrange(5, vocab) for _ in range(lens[i % len(lens)])] for i in range(n_prompts)]
    gc_ = copy.deepcopy(model.generation_config)
    gc_.eos_token_id = None
    gc_.do_sample = False
    gc_.max_new_tokens = n_new
    gc_.min_new_tokens = None
    for k in ("temperature", "top_p", "top_k"):
        if hasattr(gc_, k):
            setattr(gc_, k, None)
    refs, gaps, ulps = [], [], []
    t0 = time.monotonic()
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([p], device=model.device)
            out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=gc_,
                                 return_dict_in_generate=True, output_scores=True,
                                 pad_token_id=loaded.tokenizer.pad_token_id or 0)
            refs.append(out.sequences[0, len(p):].tolist())
            g, u = [], []
            for s in out.scores:
                top = torch.topk(s[0].float(), 2).values
                g.append(float(top[0] - top[1]))
                # rounding step of the model dtype at the top logit's magnitude
                u.append(float(torch.finfo(model.dtype if model.dtype.is_floating_point else torch.bfloat16).eps
                               * max(abs(float(top[0])), 1e-6)))
            gaps.append(g)
            ulps.append(u)
    hf_seconds = time.monotonic() - t0

    async def run_fast():
        eng = FastEngine(model, [], max_batch=max(8, n_prompts), max_seq_len=max(lens) + n_new + 1)
        await eng.start()
        try:
            async def one(i, p):
                toks = []
                async for ev in eng.submit(GenerationRequest(f"id{i}", p, SamplingParams(max_new_tokens=n_new))):
                    if ev.token_id is not None:
                        toks.append(ev.token_id)
                return toks
            return await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
        finally:
            await eng.stop()

    fast = asyncio.run(run_fast())
    # teacher-forced: is every fast-engine token an argmax of transformers' logits for the same prefix
    # (one full forward over prompt + fast tokens), exactly or within the dtype's rounding?
    tf = {"steps": 0, "fast_token_is_hf_argmax": 0, "within_2_rounding_steps": 0, "beyond": 0,
          "largest_gap_beyond": 0.0}
    eps = torch.finfo(model.dtype if model.dtype.is_floating_point else torch.bfloat16).eps
    with torch.inference_mode():
        for p, f in zip(prompts, fast):
            if not f:
                continue
            ids = torch.tensor([p + f], device=model.device)
            lg = model(ids).logits[0, len(p) - 1: len(p) - 1 + len(f)].float()
            best = lg.max(dim=-1).values
            chosen = lg.gather(1, torch.tensor(f, device=lg.device)[:, None]).squeeze(1)
            gap = (best - chosen).tolist()
            lim = (2 * eps * best.abs()).tolist()
            for gp, lm in zip(gap, lim):
                tf["steps"] += 1
                if gp == 0:
                    tf["fast_token_is_hf_argmax"] += 1
                elif gp <= lm:
                    tf["within_2_rounding_steps"] += 1
                else:
                    tf["beyond"] += 1
                    tf["largest_gap_beyond"] = max(tf["largest_gap_beyond"], gp)
    mismatches = []
    for i, (r, f) in enumerate(zip(refs, fast)):
        if r != f:
            j = next((k for k, (a, b) in enumerate(zip(r, f)) if a != b), min(len(r), len(f)))
            gap = gaps[i][j] if j < len(gaps[i]) else None
            ulp = ulps[i][j] if j < len(ulps[i]) else None
            mismatches.append({"prompt": i, "prompt_len": len(prompts[i]), "first_diff_step": j,
                               "hf_top2_logit_gap": gap, "dtype_rounding_step_at_top_logit": ulp,
                               "near_tie": (gap is not None and ulp is not None and gap <= 2 * ulp)})
    all_gaps = [g for gs in gaps for g in gs]
    near = sum(1 for gs, us in zip(gaps, ulps) for g, u in zip(gs, us) if g <= 2 * u)
    return {"prompts": n_prompts, "new_tokens": n_new, "prompt_lens": [len(p) for p in prompts],
            "identical": n_prompts - len(mismatches), "mismatches": mismatches,
            "steps_total": len(all_gaps), "steps_with_near_tie_top2": near,
            "hf_generate_seconds": round(hf_seconds, 2), "teacher_forced": tf,
            "dtype": str(model.dtype).replace("torch.", "")}


# ---------------------------------------------------------------------------- engines
def make_engine(kind: str, loaded, max_batch: int, max_total: int):
    if kind.startswith("fast"):
        from model_server.engines.fast import from_loaded

        return from_loaded(loaded, max_batch=max_batch, max_total_tokens=max_total,
                           use_cuda_graphs=False if kind == "fast-eager" else None,
                           fuse=False if kind in ("fast-eager", "fast-nofuse") else None)
    from model_server.engines.transformers_engine import TransformersEngine

    return TransformersEngine(loaded, max_batch=max_batch, max_total_tokens=max_total)


def free_memory(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def kv_bytes_per_token(model) -> int:
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    elem = 2 if model.dtype in (torch.bfloat16, torch.float16) or getattr(model, "is_loaded_in_4bit", False) else 4
    return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * elem


def run_cells(kind: str, loaded, args, device: str, energy: Energy, bw: float | None, quant: str,
              results: list, write) -> None:
    max_total = max(args.prompt_lens) + args.new_tokens + 8
    vocab = len(loaded.tokenizer)
    rng = random.Random(args.seed)
    t_build = time.monotonic()
    try:
        eng = make_engine(kind, loaded, args.max_batch, max_total)
    except Exception as exc:
        results.append({"engine": kind, "quant": quant, "error": f"{type(exc).__name__}: {exc}"})
        log(f"{kind}/{quant}: cannot build engine: {exc}")
        return

    async def main():
        await eng.start()
        startup = time.monotonic() - t_build
        extra = dict(eng.stats().extra)
        if getattr(eng, "graph_error", None):
            extra["graph_error"] = eng.graph_error
        log(f"{kind}/{quant}: started in {startup:.1f}s {json.dumps({k: v for k, v in extra.items() if k != 'graph_error'})}"
            + (f" graph_error={extra.get('graph_error')}" if extra.get("graph_error") else ""))
        # warm-up: every concurrency's first shapes, short
        warm = [[rng.randrange(5, vocab) for _ in range(args.prompt_lens[0])] for _ in range(min(8, args.max_batch))]
        await closed_loop(eng, warm, len(warm), 4)
        for plen in args.prompt_lens:
            for c in args.concurrency:
                if kind == "transformers" and not _baseline_wanted(args, quant, plen, c):
                    continue
                if kind in ("fast-eager", "fast-nofuse") and (plen != args.prompt_lens[0]
                                                              or c not in args.eager_concurrency):
                    continue
                if time.monotonic() - T0 > args.deadline_s:
                    results.append({"engine": kind, "quant": quant, "prompt_len": plen, "concurrency": c,
                                    "skipped": "deadline"})
                    continue
                n_req = max(args.min_requests, args.waves * c) if kind == "fast" else max(4 if kind.startswith("fast") else 2, c)
                prompts = [[rng.randrange(5, vocab) for _ in range(plen)] for _ in range(n_req)]
                if device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                sync(device)
                e0 = energy.millijoules()
                cell = await closed_loop(eng, prompts, c, args.new_tokens)
                sync(device)
                e1 = energy.millijoules()
                cell.update({"engine": kind, "quant": quant, "prompt_len": plen, "concurrency": c,
                             "requests": n_req})
                if e0 is not None and e1 is not None and cell["output_tokens"]:
                    cell["joules"] = (e1 - e0) / 1e3
                    cell["joules_per_token"] = round(cell["joules"] / cell["output_tokens"], 5)
                if device == "cuda":
                    cell["gpu_peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
                    cell["gpu_reserved_bytes"] = torch.cuda.memory_reserved()
                    cell["nvml_used_bytes"] = energy.used_bytes()
                if bw:
                    ctx = plen + args.new_tokens / 2
                    step_bytes = loaded.weight_bytes + c * ctx * kv_bytes_per_token(loaded.model)
                    cell["bandwidth_limit_tokens_per_second"] = round(c * bw / step_bytes, 1)
                    cell["fraction_of_bandwidth_limit"] = round(cell["tokens_per_second"]
                                                                / cell["bandwidth_limit_tokens_per_second"], 4)
                cell["rho_sys_tokens_per_s_per_gb"] = round(cell["tokens_per_second"] / (loaded.weight_bytes / 1e9), 1)
                results.append(cell)
                write()
                log(f"{kind}/{quant} P={plen} c={c}: {cell['tokens_per_second']:.0f} tok/s "
                    f"TTFT p50 {cell['ttft_p50_ms']} ms ITL p50 {cell['itl_p50_ms']} ms p99 {cell['itl_p99_ms']} ms "
                    f"J/tok {cell.get('joules_per_token')} reasons {cell['finish_reasons']}")
        if kind == "fast" and args.memory_requests > 0 and time.monotonic() - T0 < args.deadline_s:
            results.append(await memory_check(eng, args, vocab, device, rng, quant))
            write()
        return extra, startup

    try:
        extra, startup = asyncio.run(_with_stop(eng, main()))
        results.append({"engine": kind, "quant": quant, "startup_seconds": round(startup, 2),
                        "engine_extra": extra})
    except Exception as exc:
        traceback.print_exc()
        results.append({"engine": kind, "quant": quant, "error": f"{type(exc).__name__}: {exc}"})
    write()
    del eng
    free_memory(device)


async def _with_stop(eng, coro):
    try:
        return await coro
    finally:
        try:
            await eng.stop(drain=False, timeout_s=5)
        except Exception:
            pass


def _baseline_wanted(args, quant: str, plen: int, c: int) -> bool:
    if quant == "bf16" or quant == "none":
        return True
    return plen == args.prompt_lens[0] and c in args.baseline_nf4_concurrency


async def memory_check(eng, args, vocab: int, device: str, rng: random.Random, quant: str) -> dict:
    c = args.max_batch
    lens = [rng.randint(8, max(args.prompt_lens)) for _ in range(args.memory_requests)]
    prompts = [[rng.randrange(5, vocab) for _ in range(n)] for n in lens]
    news = [rng.randint(1, args.memory_new_tokens) for _ in lens]
    free_memory(device)
    before = (torch.cuda.memory_allocated(), torch.cuda.memory_reserved()) if device == "cuda" else (0, 0)
    sem = asyncio.Semaphore(c)
    done = 0

    async def one(i):
        nonlocal done
        async with sem:
            req = GenerationRequest(f"m{i}", prompts[i], SamplingParams(max_new_tokens=news[i], ignore_eos=True,
                                                                        do_sample=bool(i % 3 == 0), seed=i,
                                                                        top_p=0.9 if i % 6 == 0 else 1.0))
            async for ev in eng.submit(req):
                if i % 50 == 0 and ev.token_id is not None:   # some consumers cancel midway
                    eng.cancel(req.request_id)
        done += 1

    t0 = time.monotonic()
    half = len(prompts) // 2
    await asyncio.gather(*(one(i) for i in range(half)))
    sync(device)
    mid = (torch.cuda.memory_allocated(), torch.cuda.memory_reserved()) if device == "cuda" else (0, 0)
    await asyncio.gather(*(one(i) for i in range(half, len(prompts))))
    wall = time.monotonic() - t0
    sync(device)
    after = (torch.cuda.memory_allocated(), torch.cuda.memory_reserved()) if device == "cuda" else (0, 0)
    st = eng.stats()
    res = {"memory_check": True, "engine": "fast", "quant": quant, "requests": done, "concurrency": c,
           "wall_seconds": round(wall, 2), "allocated_before_bytes": before[0], "allocated_after_bytes": after[0],
           "reserved_before_bytes": before[1], "reserved_after_bytes": after[1],
           "allocated_growth_bytes": after[0] - before[0], "reserved_growth_bytes": after[1] - before[1],
           "allocated_growth_second_half_bytes": after[0] - mid[0],
           "reserved_growth_second_half_bytes": after[1] - mid[1],
           "running_after": st.running_requests, "free_slots_after": st.extra.get("free_slots")}
    log(f"memory check ({quant}): {json.dumps(res)}")
    return res


# ---------------------------------------------------------------------------- report
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
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "preset": args.preset,
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
