"""The fast engine's host work per decode step, with the device taken out (a CPU benchmark).

On an H200 a bf16 decode step of 64 rows is ~1.5 ms of graph, but in-process the engine makes ~535 steps
a second (1.87 ms each; docs/benchmarks.md): the rest is host work, the engine thread's (launch, the
copy down, the scheduler's per-token bookkeeping, the hand-off to the consumers) and the consumers'
(one coroutine wake-up per token on the event loop), which share one GIL. This script measures that
host work alone: the model's forward passes are replaced by stubs that return fixed logits and picks at
once, so a step costs only what the host does around it. It runs ``--streams`` closed-loop in-process
streams of ``--new-tokens`` greedy tokens (as ``steady_state.py``'s in-process cells do) for ``--seconds``
and reports steps/s, tokens/s and host microseconds per step and per token, and with ``--profile`` the
engine thread's top functions. Absolute numbers are this machine's; compare variants within one run.

Example: ``python benchmarks/host_step.py --streams 64 --seconds 5``.
"""
from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import json
import pstats
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model_server_process import synth_model  # noqa: E402
from support import default_commit, utc_date  # noqa: E402


def stub_device(eng) -> None:
    """Replace the runner's forward passes by constant results (token 7, logprob 0) that cost nothing."""
    r = eng.runner
    vocab = r.vocab
    logits = torch.zeros(r.max_batch + 8, vocab, dtype=r.dtype)
    logits[:, 7] = 1.0
    picks = torch.zeros(r.max_batch + 8, 2, dtype=torch.float64)
    picks[:, 0] = 7.0

    def decode_picks(b_needed: int, len_needed: int):
        from model_server.engines.fast.kv_cache import pick_bucket
        b = pick_bucket(r.batch_buckets, b_needed)
        return logits[:b], picks[:b]

    r.decode_picks = decode_picks
    r.prefill = lambda slots, prompts: logits[:len(prompts)]


class SimEvent:
    """A simulated device's completion: ``synchronize`` sleeps (the GIL let go, as a CUDA event's wait does)
    until the monotonic time ``t`` at which the simulated device finishes the work queued before it."""

    __slots__ = ("t",)

    def __init__(self, t: float) -> None:
        self.t = t

    def synchronize(self) -> None:
        d = self.t - time.monotonic()
        if d > 0:
            time.sleep(d)


class SimDevice:
    """One in-order device queue: a decode step takes ``decode_s``, a prefill pass of n prompts
    ``prefill_s + n * prefill_per_prompt_s``; work starts when it is launched or when the work before it
    ends, whichever is later. ``busy_s``: the device time queued so far."""

    def __init__(self, decode_s: float, prefill_s: float, prefill_per_prompt_s: float) -> None:
        self.decode_s, self.prefill_s, self.per_prompt_s = decode_s, prefill_s, prefill_per_prompt_s
        self.free_at = 0.0
        self.busy_s = 0.0

    def enqueue(self, seconds: float) -> SimEvent:
        self.free_at = max(time.monotonic(), self.free_at) + seconds
        self.busy_s += seconds
        return SimEvent(self.free_at)


def simulate_device(eng, dev: SimDevice) -> None:
    """Give every launched decode step and prefill pass of ``eng`` an event from ``dev`` (the stubbed
    forward passes cost nothing; the engine then waits on the simulated device as it would on a GPU)."""
    ex = eng.executor
    launch, prefill_launch = ex.launch, ex.prefill_launch

    def sim_launch(*a, **k):
        st = launch(*a, **k)
        if st is not None:
            st.event = dev.enqueue(dev.decode_s)
        return st

    def sim_prefill_launch(batch, t0_ns):
        pf = prefill_launch(batch, t0_ns)
        pf.event = dev.enqueue(dev.prefill_s + dev.per_prompt_s * len(batch))
        return pf

    ex.launch, ex.prefill_launch = sim_launch, sim_prefill_launch


async def run(eng, streams: int, new_tokens: int, seconds: float, dev: SimDevice | None = None) -> dict:
    from model_server.engines.base import GenerationRequest, SamplingParams

    stop = time.monotonic() + seconds
    tokens = 0

    async def stream(j: int) -> None:
        nonlocal tokens
        i = 0
        while time.monotonic() < stop:
            req = GenerationRequest(f"h{j}-{i}", [5 + j % 50] * 16,
                                    SamplingParams(max_new_tokens=new_tokens, ignore_eos=True))
            async for ev in eng.submit(req):
                if ev.token_id is not None:
                    tokens += 1
            i += 1

    s0 = eng.stats().steps_total
    p0 = eng.stats().prefill_calls_total
    busy0 = dev.busy_s if dev is not None else 0.0
    t0 = time.monotonic()
    cpu0 = time.process_time()
    await asyncio.gather(*(stream(j) for j in range(streams)))
    dt = time.monotonic() - t0
    cpu = time.process_time() - cpu0
    steps = eng.stats().steps_total - s0
    passes = eng.stats().prefill_calls_total - p0
    extra = {"device_busy": round((dev.busy_s - busy0) / dt, 4)} if dev is not None else {}
    return {**extra, "seconds": round(dt, 2), "steps": steps, "tokens": tokens,
            "steps_per_second": round(steps / dt, 1), "prefill_passes_per_second": round(passes / dt, 1), "tokens_per_second": round(tokens / dt, 1),
            "us_per_step": round(dt / steps * 1e6, 1), "cpu_us_per_token": round(cpu / tokens * 1e6, 2)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--streams", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--profile", action="store_true", help="print the engine thread's top functions")
    ap.add_argument("--device-ms", type=float, default=0.0,
                    help="simulate an in-order device on which a decode step takes this long (0: none; the "
                         "report's device_busy is the share of the wall time it was busy)")
    ap.add_argument("--prefill-ms", type=float, default=1.5, help="a simulated prefill pass: fixed part")
    ap.add_argument("--prefill-per-prompt-ms", type=float, default=0.2, help="... and per prompt")
    ap.add_argument("--switch-interval-ms", type=float, default=0.0,
                    help="sys.setswitchinterval for the run (0: leave Python's default)")
    ap.add_argument("--out", default="", help="write the JSON here")
    ap.add_argument("--commit", default=default_commit())
    args = ap.parse_args(argv)
    from model_server.engines.fast import from_loaded
    from model_server.loading import load_model

    torch.set_num_threads(1)
    loaded = load_model(str(synth_model("tiny", Path(tempfile.gettempdir()), 0)), "cpu", "none")
    eng = from_loaded(loaded, max_batch=args.streams, max_total_tokens=16 + args.new_tokens + 8)
    stub_device(eng)
    dev = None
    if args.device_ms > 0:
        dev = SimDevice(args.device_ms / 1e3, args.prefill_ms / 1e3, args.prefill_per_prompt_ms / 1e3)
        simulate_device(eng, dev)
    if args.switch_interval_ms > 0:
        sys.setswitchinterval(args.switch_interval_ms / 1e3)
    prof = cProfile.Profile() if args.profile else None
    if prof is not None:
        step = eng._step

        def profiled(*a, **k):
            prof.enable()
            try:
                return step(*a, **k)
            finally:
                prof.disable()
        eng._step = profiled

    async def go() -> list[dict]:
        await eng.start()
        try:
            return [await run(eng, args.streams, args.new_tokens, args.seconds, dev) for _ in range(args.reps)]
        finally:
            await eng.stop()
    reps = asyncio.run(go())
    report = {"date": utc_date(), "commit": args.commit, "machine": f"{sys.platform}, {__import__('os').cpu_count()} cpus",
              "streams": args.streams, "new_tokens": args.new_tokens, "device_ms": args.device_ms,
              "prefill_ms": args.prefill_ms, "prefill_per_prompt_ms": args.prefill_per_prompt_ms,
              "switch_interval_s": sys.getswitchinterval(), "reps": reps}
    for r in reps:
        print(f"device busy {r['device_busy']:.1%}, " if dev is not None else "", end="")
        print(f"{r['steps_per_second']} steps/s, {r['tokens_per_second']} tokens/s, {r['us_per_step']} us/step, "
              f"{r['cpu_us_per_token']} CPU us/token")
    if prof is not None:
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(25)
        print(buf.getvalue())
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
