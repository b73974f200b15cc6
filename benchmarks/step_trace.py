"""Where a steady in-process run's time goes on the device: a ``torch.profiler`` trace of the fast engine under
closed-loop load, summarized as device busy time, idle gaps and kernels per step (issue 17).

``decode_profile.py`` times one decode graph replayed alone; in-process at 64 streams the engine's steps take
longer than that graph (docs/benchmarks.md), and ``host_step.py --device-ms`` shows the host keeps a simulated
device busy. This script looks at the real device over a whole stretch of steady load: ``--streams`` closed-loop
streams (as ``steady_state.py``'s in-process cells: ``--prompt-len`` prompts, ``--new-tokens`` greedy tokens,
resubmitted at once), ``--warm-s`` of ramp, then a trace of ``--trace-s`` seconds. Reported
(``--out/step_trace.json`` and a summary on stdout):

* ``device_busy``: the union of the device's kernel and copy intervals over the traced span (first start to last
  end); ``idle_ms`` the rest, split into gaps by length (under 5 us, 5-20, 20-100, over 100 us), and the
  ``--top-gaps`` longest with the activity before and after each;
* per decode step (the engine's own counters over the same window): wall ms, busy ms, device activities; the
  prefill passes in the window (their kernels are counted with the steps': the trace does not tell them apart);
* the kernels with the most time per step;
* a timeline (``device.segments``): the busy stretches between idle gaps longer than ``--split-us``, so decode
  steps, prefill passes and what lies between them can be told apart.

On a machine without CUDA only the engine's counters are reported (the smoke test). Example (GPU):
``python benchmarks/step_trace.py --model-dir /tmp/m1b --streams 64 --out /tmp/st``.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from model_server_process import synth_model  # noqa: E402
from steady_load import Windows, in_process  # noqa: E402
from support import default_commit, log, utc_date  # noqa: E402

GAP_BUCKETS_US = ((0, 5), (5, 20), (20, 100), (100, float("inf")))


def device_intervals(events) -> list[tuple[float, float, str]]:
    """(start us, end us, name) of every device activity (kernels, copies, sets) in a profiler's events."""
    out = []
    for e in events:
        if str(getattr(e, "device_type", "")).endswith("CUDA"):
            tr = e.time_range
            out.append((float(tr.start), float(tr.end), e.name))
    out.sort()
    return out


def busy_and_gaps(iv: list[tuple[float, float, str]], top: int) -> dict:
    """The union of ``iv`` over its span, and the idle gaps between (bucketed; the ``top`` longest named)."""
    if not iv:
        return {"span_ms": 0.0, "busy_ms": 0.0, "device_busy": None, "gaps": [], "top_gaps": []}
    span = iv[-1][1] - iv[0][0]
    busy = 0.0
    gaps: list[tuple[float, str, str]] = []
    cur_s, cur_e, last_name = iv[0][0], iv[0][1], iv[0][2]
    for s, e, name in iv[1:]:
        if s > cur_e:
            busy += cur_e - cur_s
            gaps.append((s - cur_e, last_name, name))
            cur_s, cur_e = s, e
        elif e > cur_e:
            cur_e = e
        if e >= cur_e:
            last_name = name
    busy += cur_e - cur_s
    buckets = []
    for lo, hi in GAP_BUCKETS_US:
        sel = [g[0] for g in gaps if lo <= g[0] < hi]
        buckets.append({"from_us": lo, "to_us": None if hi == float("inf") else hi, "count": len(sel),
                        "total_ms": round(sum(sel) / 1e3, 3)})
    gaps.sort(key=lambda g: -g[0])
    return {"span_ms": round(span / 1e3, 3), "busy_ms": round(busy / 1e3, 3),
            "device_busy": round(busy / span, 4) if span > 0 else None, "gaps": buckets,
            "top_gaps": [{"us": round(g, 1), "after": a[:80], "before": b[:80]} for g, a, b in gaps[:top]]}


def segments(iv: list[tuple[float, float, str]], split_us: float, limit: int = 4000) -> list[list[float]]:
    """The device's busy stretches, split where it idles longer than ``split_us``: ``[start ms (from the first
    activity), busy-stretch ms, activities]`` each, the first ``limit`` (a timeline of steps, prefill passes and the
    gaps between them)."""
    out: list[list[float]] = []
    if not iv:
        return out
    t0, cur_s, cur_e, n = iv[0][0], iv[0][0], iv[0][1], 1
    for s, e, _ in iv[1:]:
        if s - cur_e > split_us:
            out.append([round((cur_s - t0) / 1e3, 4), round((cur_e - cur_s) / 1e3, 4), n])
            if len(out) >= limit:
                return out
            cur_s, cur_e, n = s, e, 0
        cur_e = max(cur_e, e)
        n += 1
    out.append([round((cur_s - t0) / 1e3, 4), round((cur_e - cur_s) / 1e3, 4), n])
    return out[:limit]


def top_kernels(iv: list[tuple[float, float, str]], per: float, n: int = 15) -> list[dict]:
    """The ``n`` activities with the most device time, per ``per`` (e.g. per step)."""
    acc: dict[str, list[float]] = {}
    for s, e, name in iv:
        a = acc.setdefault(name, [0, 0.0])
        a[0] += 1
        a[1] += e - s
    rows = sorted(acc.items(), key=lambda kv: -kv[1][1])[:n]
    return [{"name": k[:90], "per_step": round(c / per, 2), "us_per_step": round(us / per, 2)} for k, (c, us) in rows]


def counters(eng) -> dict:
    st = eng.stats()
    return {"steps": st.steps_total, "prefill_passes": st.prefill_calls_total, "decode_tokens": st.decode_tokens_total}


async def trace(eng, prompts: list[list[int]], args) -> dict:
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available() and eng.runner.device.type == "cuda"
    w = Windows(time.monotonic() + 0.2, args.warm_s, args.trace_s, 1)
    load = asyncio.create_task(in_process(eng, prompts, args.streams, args.new_tokens, w))
    await asyncio.sleep(max(0.0, w.t_start + w.warm_s - time.monotonic()))
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    prof = profile(activities=acts)
    c0, t0 = counters(eng), time.monotonic()
    prof.__enter__()
    await asyncio.sleep(args.trace_s)
    c1, t1 = counters(eng), time.monotonic()
    prof.__exit__(None, None, None)
    res = await load
    d = {k: c1[k] - c0[k] for k in c0}
    steps = max(1, d["steps"])
    out: dict = {"wall_ms": round((t1 - t0) * 1e3, 3), **d, "errors": res.get("errors", []),
                 "wall_ms_per_step": round((t1 - t0) * 1e3 / steps, 4),
                 "decode_tokens_per_step": round(d["decode_tokens"] / steps, 2)}
    iv = device_intervals(prof.events()) if cuda else []
    out["device"] = busy_and_gaps(iv, args.top_gaps)
    if iv:
        out["device"]["busy_ms_per_step"] = round(out["device"]["busy_ms"] / steps, 4)
        out["device"]["activities_per_step"] = round(len(iv) / steps, 1)
        out["top_kernels_per_step"] = top_kernels(iv, steps)
        out["device"]["segments_split_us"] = args.split_us
        out["device"]["segments"] = segments(iv, args.split_us)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="llama-3.2-1b")
    ap.add_argument("--model-dir", default=None, help="use this model directory instead of synthesizing one")
    ap.add_argument("--quant", default="bf16", help="none|bf16|fp16|int4|nf4 (load_model's quantization)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--streams", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--warm-s", type=float, default=4.0, help="load before the trace starts (graphs captured)")
    ap.add_argument("--trace-s", type=float, default=0.5, help="seconds traced")
    ap.add_argument("--top-gaps", type=int, default=12)
    ap.add_argument("--split-us", type=float, default=30.0,
                    help="the JSON's timeline splits the device's busy time at idle gaps longer than this (us)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--commit", default=default_commit())
    args = ap.parse_args(argv)
    if args.streams < 1 or args.trace_s <= 0 or args.warm_s < 0:
        ap.error("--streams must be >= 1, --trace-s > 0, --warm-s >= 0")
    from model_server.engines.fast import from_loaded
    from model_server.loading import load_model

    model_dir = Path(args.model_dir) if args.model_dir else synth_model(args.preset, Path(tempfile.gettempdir()), 0)
    loaded = load_model(str(model_dir), args.device, args.quant)
    eng = from_loaded(loaded, max_batch=args.streams, max_total_tokens=args.prompt_len + args.new_tokens + 8)
    rng = random.Random(0)
    hi = min(len(loaded.tokenizer), 8000)
    prompts = [[rng.randrange(300, hi) for _ in range(args.prompt_len)] for _ in range(512)]

    async def go() -> dict:
        await eng.start()
        try:
            return await trace(eng, prompts, args)
        finally:
            await eng.stop(drain=False, timeout_s=10)
    res = asyncio.run(go())
    card = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    report = {"date": utc_date(), "commit": args.commit, "card": card, "quant": args.quant,
              "streams": args.streams, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
              "warm_s": args.warm_s, "trace_s": args.trace_s, **res}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "step_trace.json").write_text(json.dumps(report, indent=2) + "\n")
    dev = res["device"]
    log(f"{card} {args.quant} x{args.streams}: {res['steps']} steps in {res['wall_ms']} ms "
        f"({res['wall_ms_per_step']} ms/step, {res['decode_tokens_per_step']} tokens/step), "
        f"{res['prefill_passes']} prefill passes")
    if dev["device_busy"] is not None:
        log(f"device busy {dev['device_busy']:.1%} of {dev['span_ms']} ms ({dev['busy_ms_per_step']} ms/step, "
            f"{dev['activities_per_step']} activities/step); gaps: "
            + ", ".join(f"{g['from_us']}-{g['to_us'] or 'inf'} us: {g['count']} / {g['total_ms']} ms" for g in dev["gaps"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
