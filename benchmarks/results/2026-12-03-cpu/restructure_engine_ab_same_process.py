"""Before (model_server_old: main at 35b920f, imported under another name) and after (this branch)
FastEngine in ONE process, alternating rounds; engine-thread CPU seconds per token (torch single-threaded).
Usage: PYTHONPATH=<after worktree>:/tmp/ms_bench/oldpkg python ab_same_process.py MODEL_DIR ROUNDS"""
import asyncio, json, statistics, sys, time
import torch
torch.set_num_threads(1)
from model_server.engines.base import GenerationRequest, SamplingParams
from model_server.engines.fast import FastEngine as After
from model_server.loading import load_model
from model_server_old.engines.base import GenerationRequest as OldReq, SamplingParams as OldSP
from model_server_old.engines.fast import FastEngine as Before

model_dir, rounds = sys.argv[1], int(sys.argv[2])
loaded = load_model(model_dir, "cpu", "none")
CFGS = [(1, 16, 32, 16), (16, 128, 32, 16)]     # concurrency, requests, new tokens, prompt length

async def run(cls, req_cls, sp_cls, conc, n_req, new, plen):
    eng = cls(loaded.model, list(loaded.eos_token_ids), max_batch=conc, max_seq_len=256, device="cpu")
    await eng.start()
    clk = time.pthread_getcpuclockid(eng._thread.ident)
    sem = asyncio.Semaphore(conc)
    toks = 0
    async def one(i):
        nonlocal toks
        async with sem:
            prompt = [(7 * i + j) % 500 + 5 for j in range(plen)]
            async for ev in eng.submit(req_cls(f"r{i}", prompt, sp_cls(max_new_tokens=new, ignore_eos=True))):
                if ev.token_id is not None:
                    toks += 1
    await asyncio.gather(*(one(i) for i in range(conc)))
    toks = 0
    c0, w0 = time.clock_gettime(clk), time.monotonic()
    await asyncio.gather(*(one(i) for i in range(n_req)))
    c1, w1 = time.clock_gettime(clk), time.monotonic()
    await eng.stop()
    return (c1 - c0) / toks * 1e6, toks / (w1 - w0)

async def main():
    res = {cfg: {"before": [], "after": []} for cfg in CFGS}
    for r in range(rounds):
        order = [("before", Before, OldReq, OldSP), ("after", After, GenerationRequest, SamplingParams)]
        if r % 2:
            order.reverse()
        for cfg in CFGS:
            for name, cls, rq, sp in order:
                cpu, tps = await run(cls, rq, sp, *cfg)
                res[cfg][name].append((cpu, tps))
                print(f"round {r} {name} c={cfg[0]}: {cpu:.1f} us CPU/token, {tps:.0f} tok/s", flush=True)
    for cfg, v in res.items():
        ratios = [a[0] / b[0] for a, b in zip(v["after"], v["before"])]
        tratios = [a[1] / b[1] for a, b in zip(v["after"], v["before"])]
        print(json.dumps({"concurrency": cfg[0], "requests": cfg[1], "new_tokens": cfg[2], "prompt_len": cfg[3],
                          "cpu_us_per_token_before_median": round(statistics.median(x[0] for x in v["before"]), 1),
                          "cpu_us_per_token_after_median": round(statistics.median(x[0] for x in v["after"]), 1),
                          "cpu_ratio_after_over_before_median": round(statistics.median(ratios), 3),
                          "tok_s_ratio_after_over_before_median": round(statistics.median(tratios), 3),
                          "rounds": len(ratios)}))
asyncio.run(main())
