"""energy_validation.py checks 1 and 2: the ledger against the counter. 1: over a mixed load,
attributed + idle energy equals the counter's delta (< 0.5 %); 2: an isolated request of >= 1 s gets
the counter's energy over its own window (< 10 %).

Owns: those two checks. Must NOT: start the proxy or the model server (energy_validation.py does).
"""
from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
from energy_validation_clients import cumulative_series, http_json, interp, openai_once, openai_stream, tgi_stream
from energy_validation_run import Run, console


async def check1(run: Run) -> dict[str, Any]:
    args, px, model = run.args, run.px, run.model
    rnd, ms_url, uuids, ledger, sampler, gpu_ids, direct = (run.rnd, run.ms_url, run.uuids, run.ledger,
                                                           run.sampler, run.gpu_ids, run.direct)
    settle, edge = run.settle, run.edge
    dur = 8.0 if args.quick else 60.0
    console.print(f"[bold]check 1[/]: {dur:.0f} s mixed load through the proxy")
    await settle()
    # also watch the model server's /energy, as the remote source would (informational)
    from edge_proxy.energy.remote_source import RemoteReader
    from edge_proxy.energy.sampler import Sampler
    remote = Sampler(RemoteReader(ms_url, uuids or None), args.period)
    remote.start()
    await asyncio.sleep(1.0)
    a = edge()
    counts = {"stream_chat": 0, "completion": 0, "tgi_stream": 0, "errors": 0}
    # prompt + output within the server's context (a small model's 512 tokens: the tiny preset on CPU, whose tokenizer
    # makes "word " 3 tokens; 4 assumed). The llama-3.2-1b preset's limit is far above this load's longest request,
    # which is unchanged.
    total = int(http_json(ms_url + "/info").get("max_total_tokens") or 4096)

    async def worker(w: int, s: aiohttp.ClientSession) -> None:
        end = time.monotonic() + dur
        k = 0
        while time.monotonic() < end:
            await asyncio.sleep(rnd.uniform(0.0, 0.4))
            mt = rnd.choice([16, 32, 64, 128, 256]) if not args.quick else rnd.choice([8, 16, 32])
            words = rnd.randint(4, 200 if not args.quick else 40)
            mt = min(mt, max(8, total - 16 - 4 * words))
            words = min(words, max(4, (total - 16 - mt) // 4))
            prompt = "word " * words
            kind = rnd.choice(["stream_chat", "completion", "tgi_stream"])
            rid = f"mix-{w}-{k}"
            k += 1
            try:
                if kind == "stream_chat":
                    r = await openai_stream(s, px, model, prompt, mt, rid)
                    ok = r.status == 200
                elif kind == "completion":
                    ok = await openai_once(s, px, model, prompt, mt, rid) == 200
                else:
                    ok = await tgi_stream(s, px, prompt, mt, rid) == 200
            except aiohttp.ClientError:
                ok = False
            counts[kind if ok else "errors"] += 1

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as s:
        await asyncio.gather(*(worker(w, s) for w in range(8 if not args.quick else 4)))
    await settle()
    b = edge()
    ledger_delta = b["ledger_active_plus_idle_j"] - a["ledger_active_plus_idle_j"]
    measured_delta = b["ledger_measured_j"] - a["ledger_measured_j"]
    series = cumulative_series(list(sampler.readings), gpu_ids)
    c1: dict[str, Any] = {"seconds": dur, "requests": counts, "ledger_delta_j": ledger_delta,
                          "measured_ticks_delta_j": measured_delta,
                          "conservation_error": abs(ledger_delta - measured_delta) / max(1e-9, measured_delta)}
    p_idle = ledger.idle_watts
    if direct is not None:
        # the ledger covers ticks up to tick_end; the direct read came a little later: add idle
        # power over that edge (both edges), so the two windows match
        adj = p_idle * ((b["direct_t_ns"] - b["tick_end_ns"]) - (a["direct_t_ns"] - a["tick_end_ns"])) / 1e9
        counter_delta = b["direct_counter_j"] - a["direct_counter_j"]
        c1.update({"counter": "direct NVML reads at the window edges", "counter_delta_j": counter_delta,
                   "edge_idle_adjustment_j": adj})
        compare = ledger_delta + adj
    else:
        ea, eb = interp(series, a["tick_end_ns"]), interp(series, b["tick_end_ns"])
        counter_delta = (eb - ea) if ea is not None and eb is not None else float("nan")
        c1.update({"counter": "sampler's raw counter readings", "counter_delta_j": counter_delta})
        compare = ledger_delta
    c1["relative_error"] = abs(compare - counter_delta) / counter_delta if counter_delta > 0 else None
    if remote.running:
        await asyncio.sleep(2 * args.period + 0.3)
        remote.stop()
        rs = cumulative_series(list(remote.readings), list(remote.reader.gpu_uuids))
        ta, tb = a.get("direct_t_ns", a["tick_end_ns"]), b.get("direct_t_ns", b["tick_end_ns"])
        ra, rb = interp(rs, ta), interp(rs, tb)
        rdelta = (rb - ra) if ra is not None and rb is not None else None
        offset = remote.reader.offset_ns
        c1["remote_source"] = {
            "note": "informational: the model server's /energy samples, aligned to the local clock",
            "delta_j": rdelta, "relative_difference": (abs(rdelta - counter_delta) / counter_delta
                                                       if rdelta is not None and counter_delta > 0 else None),
            "clock_offset_s": offset / 1e9 if offset is not None else None,
            "best_rtt_s": min(remote.reader._offsets)[0] / 1e9 if remote.reader._offsets else None,  # noqa: SLF001
            "errors": remote.errors_total}
    c1["mean_power_w"] = measured_delta / ((b["tick_end_ns"] - a["tick_end_ns"]) / 1e9)
    c1["pass"] = c1["relative_error"] is not None and c1["relative_error"] < 0.005
    return c1


async def check2(run: Run) -> dict[str, Any]:
    args, px, model = run.args, run.px, run.model
    finals, sampler, gpu_ids, state, max_tokens_cap = run.finals, run.sampler, run.gpu_ids, run.state, run.max_tokens_cap
    settle = run.settle
    console.print("[bold]check 2[/]: isolated sequential requests of >= 1 s")
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as s:
        cal = await openai_stream(s, px, model, "calibrate", 64, "cal-0")
        tt = cal.token_times
        rate = max(1.0, (len(tt) - 1) / max(1e-3, (tt[-1] - tt[0]) / 1e9)) if len(tt) > 2 else 16.0
        target_s = 1.5
        n_tok = int(min(max_tokens_cap, max(16, rate * target_s)))
        state["n_tok"] = n_tok
        await settle()
        rows = []
        want = 2 if args.quick else 5
        attempt = 0
        while len(rows) < want and attempt < want + 4:
            attempt += 1
            await asyncio.sleep(1.0)
            rid = f"iso-{attempt}"
            await openai_stream(s, px, model, "an isolated request " * 4, n_tok, rid)
            await settle()
            rec = finals.by_id.get(rid)
            if (rec is not None and rec.duration_seconds is not None and rec.duration_seconds < 1.0
                    and n_tok < max_tokens_cap):   # too short: lengthen and do not count it
                n_tok = min(max_tokens_cap, int(n_tok * 1.6 / max(0.01, rec.duration_seconds)) + 1)
                state["n_tok"] = n_tok
                continue
            if rec is not None and rec.duration_seconds is not None and rec.duration_seconds > 3.0:
                n_tok = max(16, int(n_tok * 1.6 / rec.duration_seconds))   # keep the run short
                state["n_tok"] = n_tok
            series = cumulative_series(list(sampler.readings), gpu_ids)
            if rec is None or rec.energy is None:
                rows.append({"rid": rid, "error": "no record"})
                continue
            t_in = rec.t_forwarded_ns or rec.t_received_ns      # in flight from forwarding (the ledger's rule)
            e0, e1 = interp(series, t_in), interp(series, rec.t_end_ns)
            ref = (e1 - e0) if e0 is not None and e1 is not None else None
            rows.append({"rid": rid, "duration_s": rec.duration_seconds, "output_tokens": rec.output_tokens,
                         "full_j": rec.energy.full_joules, "active_j": rec.energy.active_joules,
                         "provisional": rec.energy.provisional, "counter_window_j": ref,
                         "relative_error": abs(rec.energy.full_joules - ref) / ref if ref else None})
    ok = [r for r in rows if r.get("relative_error") is not None]
    return {
        "tokens_per_request": n_tok, "calibrated_tokens_per_s": rate, "requests": rows,
        "max_relative_error": max((r["relative_error"] for r in ok), default=None),
        "min_duration_s": min((r["duration_s"] for r in ok), default=None),
        "pass": bool(ok) and len(ok) == len(rows) and all(r["relative_error"] < 0.10 for r in ok)
        and all(r["duration_s"] >= 1.0 for r in ok)}
