"""energy_validation.py checks 3 and 4: how the ledger apportions shared ticks. 3: 16 identical
concurrent requests each get the mean full energy (< 10 %); 4: of two concurrent requests, the one
with twice the output tokens gets 1.6x-2.4x the energy (alone, and 4b inside a steady load).

Owns: those checks. Must NOT: start the proxy or the model server (energy_validation.py does).
"""
from __future__ import annotations

import asyncio
import statistics
from typing import Any

import aiohttp
from energy_validation_clients import cumulative_series, interp, openai_stream
from energy_validation_run import Run, console
from loop_watch import LoopWatch


async def check3(run: Run) -> dict[str, Any]:
    args, px, model = run.args, run.px, run.model
    finals = run.finals
    settle = run.settle
    console.print("[bold]check 3[/]: 16 identical concurrent requests")
    n3 = 16
    tok3 = 32 if args.quick else 128
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as s, \
            LoopWatch(getattr(args, "ms_pid", None)) as watch:
        await asyncio.gather(*(openai_stream(s, px, model, "the same prompt for everyone", tok3, f"same-{i}")
                               for i in range(n3)))
    await settle()
    recs = [finals.by_id.get(f"same-{i}") for i in range(n3)]
    fulls = [r.energy.full_joules for r in recs if r is not None and r.energy is not None]
    mean = statistics.fmean(fulls) if fulls else float("nan")
    dev = max(abs(x - mean) / mean for x in fulls) if fulls and mean > 0 else None
    # when each request reached the backend and got its first token, from the earliest
    # forward (ms): identical requests that reach a batching engine a step apart are not
    # identical in cost (the first ones decode a step or two in a smaller batch)
    fwd0 = min((r.t_forwarded_ns for r in recs if r is not None and r.t_forwarded_ns), default=0)
    return {
        "received_ms": [round((r.t_received_ns - fwd0) / 1e6, 3) if r and r.t_received_ns else None
                        for r in recs],
        "event_loop": watch.summary(),
        "forwarded_ms": [round((r.t_forwarded_ns - fwd0) / 1e6, 3) if r and r.t_forwarded_ns else None
                         for r in recs],
        "first_token_ms": [round((r.t_first_token_ns - fwd0) / 1e6, 3) if r and r.t_first_token_ns else None
                           for r in recs],
        "requests": n3, "tokens": tok3, "full_j": fulls, "mean_full_j": mean,
        "active_j": [r.energy.active_joules for r in recs if r is not None and r.energy is not None],
        "max_relative_deviation": dev, "provisional": sum(1 for r in recs if r and r.energy and r.energy.provisional),
        "pass": dev is not None and len(fulls) == n3 and dev < 0.10}


async def check4(run: Run, background: int = 0) -> dict[str, Any]:
    px, model = run.px, run.model
    finals, sampler, gpu_ids, state = run.finals, run.sampler, run.gpu_ids, run.state
    settle = run.settle
    # background > 0: the pair runs inside a steady load of `background` other streams, so the
    # batch is about the same size all along and a token costs about the same in every tick.
    # Alone (background 0), the longer request runs its second half as a batch of one and pays
    # every tick of it: the ratio then tends to 1 + 2*E_solo/E_shared (about 3 on a
    # memory-bound decode), which is what the counter says too (ratio_implied_by_counter).
    label = f" inside {background} background streams" if background else " alone"
    console.print(f"[bold]check 4[/]: two concurrent requests, 1x and 2x output tokens{label}")
    tok4 = max(16, state["n_tok"] // 2)
    tag = f"bg{background}-" if background else ""
    stop_bg = asyncio.Event()

    async def bg_stream(s: aiohttp.ClientSession, i: int) -> None:
        k = 0
        while not stop_bg.is_set():
            await openai_stream(s, px, model, "background load", tok4, f"{tag}bg-{i}-{k}")
            k += 1

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as s:
        bg = [asyncio.create_task(bg_stream(s, i)) for i in range(background)]
        await asyncio.sleep(1.0 + (2.0 if background else 0.0))
        await asyncio.gather(openai_stream(s, px, model, "pair prompt", tok4, f"{tag}pair-1x"),
                             openai_stream(s, px, model, "pair prompt", 2 * tok4, f"{tag}pair-2x"))
        stop_bg.set()
        await asyncio.gather(*bg, return_exceptions=True)
    await settle()
    r1, r2 = finals.by_id.get(f"{tag}pair-1x"), finals.by_id.get(f"{tag}pair-2x")
    c4: dict[str, Any] = {"tokens": [tok4, 2 * tok4], "background_streams": background}
    if r1 is not None and r2 is not None and r1.energy and r2.energy and r1.energy.full_joules > 0:
        series = cumulative_series(list(sampler.readings), gpu_ids)
        t_s = min(r1.t_forwarded_ns or r1.t_received_ns, r2.t_forwarded_ns or r2.t_received_ns)
        e_s, e_m, e_e = interp(series, t_s), interp(series, r1.t_end_ns), interp(series, r2.t_end_ns)
        c4.update({"full_j": [r1.energy.full_joules, r2.energy.full_joules],
                   "active_j": [r1.energy.active_joules, r2.energy.active_joules],
                   "output_tokens": [r1.output_tokens, r2.output_tokens],
                   "ratio_full": r2.energy.full_joules / r1.energy.full_joules,
                   "ratio_active": (r2.energy.active_joules / r1.energy.active_joules
                                    if r1.energy.active_joules > 0 else None)})
        if None not in (e_s, e_m, e_e) and (e_m - e_s) > 0:
            shared, solo = e_m - e_s, e_e - e_m
            c4.update({"counter_shared_j": shared, "counter_solo_j": solo,
                       "ratio_implied_by_counter": 1 + 2 * solo / shared})
        c4["pass"] = 1.6 <= c4["ratio_full"] <= 2.4
    else:
        c4["pass"] = False
        c4["error"] = "records missing"
    return c4
