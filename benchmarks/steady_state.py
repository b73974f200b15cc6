"""Steady-state throughput of the fast engine: bf16 vs INT4 vs NF4 in-process, HTTP vs in-process,
ρ_sys from measured weight bytes, ITL and what bounds it, greedy agreement. One run, one card.

Every throughput figure comes from a steady-state cell (``benchmarks/steady_load.py``): ``c`` streams
kept busy, ``--reps`` consecutive windows of ``--window-s`` seconds after a ``--warm-s`` ramp; each
window is one repetition; the median and the spread (min..max) are reported.

Steps (results written to ``--out/steady_state.json`` as they exist, with the ``MODEL_SERVER_*`` switches set in the
environment under ``switches``: an A/B arm's file says which arm it is):
1. the model (``model-server synth --preset``), copy bandwidth (1 GiB device copy, read + write);
2. INT4 kernel check on random weights (``Int4Linear`` vs ``x @ dequant(W)^T`` in float64);
3. for each quantization: ``load_model`` (weight bytes as loaded), fast engine, cells at each
   ``--concurrency`` (bf16 also at ``--http-concurrency``); decode-graph replay time alone at batch 1 and
   64 (device time per step without the host loop); greedy outputs on ``--agree-prompts`` prompts
   (free-running token match against bf16, and teacher-forced: this model's argmax on bf16's tokens);
   (``gptq`` / ``gptq-act``: a GPTQ-format copy of the model, ``model_server_process.gptq_checkpoint``, loaded as ``serve --engine
   fast`` loads it; its teacher-forced match is not computed: the native build has no ``forward``);
4. HTTP: ``model-server serve --engine fast`` (bf16, started while step 3 loads bf16; one server per
   ``--api-workers`` value, e.g. ``0,4``: HTTP in the engine's process vs 4 API worker processes), cells at
   ``--http-concurrency`` with client processes (one per ``--client-streams`` streams, default 32)
   counting against the same windows (``steady_load.cell_http``); each HTTP cell's ``ratio_to_in_process``
   is against the in-process cell at the same concurrency, and ``client_cpu_per_process`` is the
   client processes' mean share of one core over the cell (near 1: the load generator is the limit).
   Every cell also has the engine's own view of its windows (``engine_steps_per_second``,
   ``engine_tokens_per_step``, about the mean batch; from ``stats()`` in-process, from ``/metrics`` over
   HTTP): a lower HTTP ratio from slower steps vs from emptier batches.

CPU smoke: ``python benchmarks/steady_state.py --preset tiny --quants bf16,int4 --concurrency 1,4
--http-concurrency 4 --window-s 1 --warm-s 1 --new-tokens 16 --out /tmp/ss``
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from engine_measure import Energy, copy_bandwidth_bytes_per_s, kv_bytes_per_token  # noqa: E402
from model_server_process import Server, gptq_checkpoint, synth_model  # noqa: E402
from graph_step import drained, graph_step_ms  # noqa: E402
from steady_load import Windows, cell_http, engine_rates, in_process, pct_ms, summarize  # noqa: E402
from support import default_commit, log, utc_date  # noqa: E402

PAPER_RHO_SYS = 6930.0
GPTQ_FORMATS = ("gptq", "gptq-act")


def int4_kernel_check(device: str) -> dict:
    from torch import nn

    from model_server.int4 import Int4Linear, device_compute
    from model_server.int4_quant import dequantize_groupwise, quantize_groupwise

    ch = device_compute(device)
    out = {"kernel": ch.int4_kernel, "rows_kernel": ch.rows_kernel, "dtype": str(ch.dtype), "reason": ch.reason}
    # both sides of Int4Linear's dispatch by rows; a narrow layer (2,048 outputs) also holds the mma mode's int4pack
    # copy for its steps of few rows (int4_choice.mma_int4pack_rows)
    for tag, n, rows in (("", 8192, (1, 8, 9, 64, 256)), ("narrow_", 2048, (1, 4, 5, 64))):
        lin = nn.Linear(2048, n, bias=False).to(device=device, dtype=ch.dtype)
        q, sz = quantize_groupwise(lin.weight, 128)
        w = dequantize_groupwise(q, sz, 128).double()
        layer = Int4Linear(lin, 128, ch)
        for m in rows:
            x = torch.randn(m, 2048, device=device, dtype=ch.dtype)
            ref = x.double() @ w.t()
            y = layer(x)
            out[f"rel_err_{tag}m{m}"] = float((y.double() - ref).norm() / ref.norm())
            if tag:
                out[f"kernel_{tag}m{m}"] = layer.step_kernel(m)
    return out


async def cell_in_process(eng, prompts, c, args, energy) -> dict:
    w = Windows(time.monotonic() + 0.2, args.warm_s, args.window_s, args.reps)
    e = {}

    def counters() -> tuple[float, float, float]:
        st = eng.stats()
        return float(st.steps_total), float(st.decode_tokens_total), float(st.prefill_calls_total)

    async def mark():
        await asyncio.sleep(max(0, w.t_start + w.warm_s - time.monotonic()))
        e["a"], e["ca"] = energy.millijoules(), counters()
        await asyncio.sleep(max(0, w.t_end - time.monotonic()))
        e["b"], e["cb"] = energy.millijoules(), counters()
    mt = asyncio.create_task(mark())
    res = await in_process(eng, prompts, c, args.new_tokens, w)
    await mt
    res.update(summarize(w.tokens, args.window_s), concurrency=c, itl_p50_ms=pct_ms(w.itl, 50),
               itl_p99_ms=pct_ms(w.itl, 99))
    res.update(engine_rates(e.get("ca"), e.get("cb"), args.reps * args.window_s))
    if e.get("a") is not None and e.get("b") is not None and sum(w.tokens):
        res["joules_per_token"] = round((e["b"] - e["a"]) / 1e3 / sum(w.tokens), 6)
    return res


async def greedy(eng, prompts: list[list[int]], n: int) -> list[list[int]]:
    from model_server.engines.base import GenerationRequest, SamplingParams

    async def one(i, p):
        toks = []
        async for ev in eng.submit(GenerationRequest(f"g{i}", p, SamplingParams(max_new_tokens=n, ignore_eos=True))):
            if ev.token_id is not None:
                toks.append(ev.token_id)
        return toks
    return await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))


def agreement(model, prompts, mine, ref) -> dict:
    pos = sum(a == b for x, y in zip(mine, ref) for a, b in zip(x, y))
    total = sum(len(y) for y in ref)
    prefix = [next((k for k, (a, b) in enumerate(zip(x, y)) if a != b), len(y)) for x, y in zip(mine, ref)]
    tf = 0
    if getattr(model, "native", False):         # model_server.native's build runs only through the engine
        return {"free_running_match": round(pos / total, 4), "mean_common_prefix": round(statistics.mean(prefix), 2),
                "teacher_forced_match": None, "tokens": total}
    with torch.inference_mode():
        for p, y in zip(prompts, ref):
            ids = torch.tensor([p + y], device=model.device)
            am = model(ids).logits[0, len(p) - 1: len(p) - 1 + len(y)].argmax(-1).tolist()
            tf += sum(a == b for a, b in zip(am, y))
    return {"free_running_match": round(pos / total, 4), "mean_common_prefix": round(statistics.mean(prefix), 2),
            "teacher_forced_match": round(tf / total, 4), "tokens": total}


def run_quant(q, args, model_dir, device, bw, energy, report, save, start_server) -> None:
    from model_server import int4_mma_glu
    from model_server.engines.fast import from_loaded
    from model_server.loading import load_model

    quant, _, kernels = q.partition(":")          # e.g. int4:triton sets MODEL_SERVER_INT4_KERNELS for this load
    if kernels:
        os.environ["MODEL_SERVER_INT4_KERNELS"] = kernels
    else:
        os.environ.pop("MODEL_SERVER_INT4_KERNELS", None)
    t = time.monotonic()
    if quant in GPTQ_FORMATS:       # a GPTQ-format checkpoint of the model, served as serve --engine fast serves it
        loaded = load_model(str(gptq_checkpoint(model_dir, quant)), device, "none", native=True)
    else:
        loaded = load_model(str(model_dir), device, quant)
    entry = {"quant": q, "weight_bytes": loaded.weight_bytes, "dtype": loaded.dtype,
             "int4_kernel": getattr(loaded.model, "int4_kernel", None),
             "load_seconds": round(time.monotonic() - t, 2), "cells": [], "http": []}
    report["quants"].append(entry)
    servers = start_server() if start_server else []
    conc = sorted(set(args.concurrency + (args.http_concurrency if servers else [])))
    max_batch = max(conc)
    eng = from_loaded(loaded, max_batch=max_batch, max_total_tokens=args.prompt_len + args.new_tokens + 8)
    rng = random.Random(args.seed)
    vocab = len(loaded.tokenizer)
    prompts = [[rng.randrange(300, min(vocab, 8000)) for _ in range(args.prompt_len)] for _ in range(512)]
    agree_prompts = prompts[: args.agree_prompts]
    kvb = kv_bytes_per_token(loaded.model)

    async def main():
        t1 = time.monotonic()
        await eng.start()
        entry["engine_start_seconds"] = round(time.monotonic() - t1, 2)
        entry["engine_extra"] = {k: v for k, v in eng.stats().extra.items() if "seconds" in k or "graphs" in k}
        # the mma GLU epilogue serves the gate/up (the process's state: None for a format without INT4 kernels)
        entry["mma_glu_ready"] = int4_mma_glu.serves(device) if entry["int4_kernel"] else None
        log(f"{q}: weights {loaded.weight_bytes / 1e9:.3f} GB, engine up in {entry['engine_start_seconds']} s")
        toks = await greedy(eng, agree_prompts, args.agree_tokens)
        report["greedy"][q] = toks
        if "bf16" in report["greedy"] and q != "bf16":
            entry["agreement_vs_bf16"] = agreement(loaded.model, agree_prompts, toks, report["greedy"]["bf16"])
            # random weights give near-flat logits, where any rounding flips the argmax: not a quality reading
            entry["agreement_vs_bf16"]["synthetic_weights"] = loaded.synthetic
        for server in servers:
            entry["server_info"] = await asyncio.to_thread(server.wait_ready, 300)
        for c in conc:
            cell = await cell_in_process(eng, prompts, c, args, energy)
            if bw:
                step = loaded.weight_bytes + c * (args.prompt_len + args.new_tokens / 2) * kvb
                cell["bandwidth_limit_tokens_per_second"] = round(c * bw / step, 1)
                cell["fraction_of_bandwidth_limit"] = round(cell["tokens_per_second_median"]
                                                            / cell["bandwidth_limit_tokens_per_second"], 4)
            cell["rho_sys_tokens_per_s_per_gb"] = round(cell["tokens_per_second_median"] / (loaded.weight_bytes / 1e9), 1)
            entry["cells"].append(cell)
            save()
            log(f"{q} c={c}: {cell['tokens_per_second_median']} tok/s ({cell['tokens_per_second_min']}.."
                f"{cell['tokens_per_second_max']}) ITL p50 {cell['itl_p50_ms']} ms")
        length = eng.runner.length_buckets[0] if eng.runner.length_buckets else None
        # the background warm-up may still be compiling on its own thread (it waits for the engine to go idle, i.e.
        # for the cells to end): a graph captured here meanwhile fails both (H100 2026-12-06 00:40, rule run)
        await eng.wait_warm(600)
        # ... and the engine thread may still be finishing the last cell's streams, capturing a graph for each smaller
        # batch as they drain: an eager step here meanwhile breaks the capture (H100 2026-12-06 11:00, ss_fused)
        await drained(eng, 120)
        for b in (1, 64):
            if length is not None and b <= max_batch:
                entry[f"graph_step_ms_b{b}"] = await asyncio.to_thread(graph_step_ms, eng, b,
                                                                      args.prompt_len + args.new_tokens, device)
        in_proc = {cell["concurrency"]: cell["tokens_per_second_median"] for cell in entry["cells"]}
        for server in servers:
            info = entry["server_info"]
            for c in args.http_concurrency:
                cell = await asyncio.to_thread(cell_http, server.url, info.get("model_id") or "model", c, args,
                                               min(vocab, 8000))
                cell["api_workers"] = server.api_workers
                cell["ratio_to_in_process"] = round(cell["tokens_per_second_median"] / in_proc[c], 4) if in_proc.get(c) else None
                entry["http"].append(cell)
                save()
                log(f"HTTP {q} api-workers {server.api_workers} c={c}: {cell['tokens_per_second_median']} tok/s "
                    f"({cell['ratio_to_in_process']} of in-process) errors {cell['errors']}")
        await eng.stop(drain=False, timeout_s=5)

    try:
        asyncio.run(main())
    finally:
        for server in servers:
            server.stop()
    del eng, loaded
    if device == "cuda":
        torch.cuda.empty_cache()
    save()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="llama-3.2-1b")
    ap.add_argument("--model-dir", default=None, help="use this model directory instead of synthesizing one")
    ap.add_argument("--out", required=True)
    ap.add_argument("--quants", default="bf16,int4,nf4",
                    help="comma-separated; int4:<mode> (auto, mma, mixed, tinygemm, triton, triton-gemm) sets "
                         "MODEL_SERVER_INT4_KERNELS for that load; "
                         "gptq, gptq-act: a GPTQ-format copy of the model (act order) on the fast engine's repack")
    ap.add_argument("--concurrency", default="1,8,64")
    ap.add_argument("--http-concurrency", default="64,256", help="bf16 only, in-process and HTTP ('' = none)")
    ap.add_argument("--api-workers", default="0", help="comma-separated: one HTTP server per value (serve --api-workers)")
    ap.add_argument("--client-streams", type=int, default=32, help="HTTP streams per load-generator process")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--window-s", type=float, default=10.0)
    ap.add_argument("--warm-s", type=float, default=2.0)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--agree-prompts", type=int, default=16)
    ap.add_argument("--agree-tokens", type=int, default=64)
    ap.add_argument("--commit", default=default_commit())
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    args.concurrency = [int(x) for x in args.concurrency.split(",") if x]
    args.http_concurrency = [int(x) for x in args.http_concurrency.split(",") if x]
    args.api_workers = [int(x) for x in args.api_workers.split(",") if x]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    energy = Energy()
    report = {"card": energy.name() if device == "cuda" else "cpu", "date": utc_date("%Y-%m-%d"),
              "commit": args.commit, "command": "python benchmarks/steady_state.py " + " ".join(sys.argv[1:]),
              "torch": torch.__version__, "preset": args.preset, "window_s": args.window_s, "reps": args.reps,
              "warm_s": args.warm_s, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
              "switches": {k: v for k, v in sorted(os.environ.items()) if k.startswith("MODEL_SERVER_")},
              "quants": [], "greedy": {}}

    def save():
        (out / "steady_state.json").write_text(json.dumps({k: v for k, v in report.items() if k != "greedy"}, indent=1))
    bw = copy_bandwidth_bytes_per_s(device)
    report["copy_bandwidth_gb_per_s"] = round(bw / 1e9, 1) if bw else None
    report["int4_kernel_check"] = int4_kernel_check(device)
    log(f"card {report['card']}, copy bandwidth {report['copy_bandwidth_gb_per_s']} GB/s, int4 check "
        f"{report['int4_kernel_check']}")
    work = Path(tempfile.mkdtemp(prefix="steady_"))
    model_dir = Path(args.model_dir) if args.model_dir else synth_model(args.preset, work, 0)
    save()
    for q in args.quants.split(","):
        start = None
        if q == "bf16" and args.http_concurrency:
            def start(q=q):
                return [Server(model_dir, q, "fast", device, max(args.http_concurrency), args.prompt_len + args.new_tokens
                               + 8, out / (f"server_w{w}.log" if w else "server.log"), api_workers=w)
                        for w in args.api_workers]
        try:
            run_quant(q, args, model_dir, device, bw, energy, report, save, start)
        except Exception as exc:  # noqa: BLE001 - record and go on with the next quantization
            import traceback
            traceback.print_exc()
            report["quants"].append({"quant": q, "error": f"{type(exc).__name__}: {exc}"[:500]})
            save()
    save()
    for e in report["quants"]:
        for c in e.get("cells", []):
            print(f"{e['quant']:5} c={c['concurrency']:3} {c['tokens_per_second_median']:9.1f} tok/s "
                  f"[{c['tokens_per_second_min']}..{c['tokens_per_second_max']}] ITL p50 {c['itl_p50_ms']} "
                  f"rho {c['rho_sys_tokens_per_s_per_gb']} bw {c.get('fraction_of_bandwidth_limit')} "
                  f"engine steps/s {c.get('engine_steps_per_second')} tokens/step {c.get('engine_tokens_per_step')} "
                  f"prefills/s {c.get('engine_prefills_per_second')}")
        for c in e.get("http", []):
            print(f"HTTP  c={c['concurrency']:3} api-workers {c.get('api_workers', 0)} {c['tokens_per_second_median']:9.1f} "
                  f"tok/s [{c['tokens_per_second_min']}..{c['tokens_per_second_max']}] "
                  f"{c.get('ratio_to_in_process')} of in-process, err {c['errors']}, "
                  f"client cpu {c.get('client_cpu_per_process')} x {c['client_processes']}, "
                  f"engine steps/s {c.get('engine_steps_per_second')} tokens/step {c.get('engine_tokens_per_step')} "
                  f"prefills/s {c.get('engine_prefills_per_second')}")
        print(e["quant"], "weights", e.get("weight_bytes"), "graph b1/b64 ms", e.get("graph_step_ms_b1"),
              e.get("graph_step_ms_b64"), "agree (synthetic weights: not a quality reading)"
              if (e.get("agreement_vs_bf16") or {}).get("synthetic_weights") else "agree", e.get("agreement_vs_bf16"),
              e.get("error", ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
