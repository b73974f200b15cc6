"""engine_throughput.py's cells: build an engine (fast, fast-nofuse, fast-eager, transformers), run its
prompt-length x concurrency cells closed loop (energy, peak memory, the memory-bandwidth limit of
each cell), and the fast engine's memory check (many requests; allocated/reserved must not grow).

Owns: running the cells. Must NOT: write files (the ``write`` callback does) or load models.
"""
from __future__ import annotations

import asyncio
import json
import random
import time
import traceback

import torch

from engine_measure import Energy, closed_loop, free_memory, kv_bytes_per_token, sync
from model_server.engines.base import GenerationRequest, SamplingParams
from support import T0, log


def make_engine(kind: str, loaded, max_batch: int, max_total: int):
    if kind.startswith("fast"):
        from model_server.engines.fast import from_loaded

        return from_loaded(loaded, max_batch=max_batch, max_total_tokens=max_total,
                           use_cuda_graphs=False if kind == "fast-eager" else None,
                           fuse=False if kind in ("fast-eager", "fast-nofuse") else None)
    from model_server.engines.transformers_engine import TransformersEngine

    return TransformersEngine(loaded, max_batch=max_batch, max_total_tokens=max_total)


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
