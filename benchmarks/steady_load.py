"""Steady-state closed-loop load, counted in fixed time windows (used by ``steady_state.py``).

A cell keeps ``c`` streams busy (a finished request is replaced at once) from ``t_start`` until the
last window ends; tokens are counted by arrival time in ``reps`` consecutive windows of ``window_s``
seconds that begin ``warm_s`` after ``t_start`` (so the ramp-up prefill burst is outside every
window). Each window is one repetition: tokens/s = tokens arriving in it / ``window_s``.
Times are ``time.monotonic()`` (CLOCK_MONOTONIC, shared by every process on the host), so HTTP client
processes count against the same windows as the parent.

HTTP client: ``python benchmarks/steady_load.py URL MODEL STREAMS PROMPT_LEN NEW_TOKENS T_START WARM_S
WINDOW_S REPS SEED ID_HI`` prints one JSON line: tokens per window, ITL samples (seconds between chunks
of a stream, first window only), errors. Several such processes share the streams of one cell so the
client is not the bottleneck. :func:`cell_http` (the parent's side) starts them, one per
``args.client_streams`` streams, and sums their windows.
"""
from __future__ import annotations

import asyncio
import json
import random
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Windows:
    t_start: float
    warm_s: float
    window_s: float
    reps: int
    tokens: list[int] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)   # first window only, to bound memory

    def __post_init__(self) -> None:
        self.tokens = [0] * self.reps

    @property
    def t_end(self) -> float:
        return self.t_start + self.warm_s + self.reps * self.window_s

    def add(self, now: float, n: int = 1, gap: float | None = None) -> None:
        k = int((now - self.t_start - self.warm_s) // self.window_s)
        if 0 <= k < self.reps:
            self.tokens[k] += n
            if k == 0 and gap is not None:
                self.itl.append(gap)


async def _until(t: float) -> None:
    await asyncio.sleep(max(0.0, t - time.monotonic()))


async def in_process(engine, prompts: list[list[int]], streams: int, new_tokens: int, w: Windows) -> dict:
    """Closed loop against an engine's ``submit`` on this event loop."""
    from model_server.engines.base import GenerationRequest, SamplingParams

    errors: list[str] = []

    async def stream(j: int) -> None:
        i = j
        while time.monotonic() < w.t_end:
            req = GenerationRequest(f"s{j}-{i}-{random.getrandbits(32)}", prompts[i % len(prompts)],
                                    SamplingParams(max_new_tokens=new_tokens, ignore_eos=True),
                                    arrival_ns=time.monotonic_ns())
            last = None
            async for ev in engine.submit(req):
                now = time.monotonic()
                if ev.token_id is not None:
                    w.add(now, 1, None if last is None else now - last)
                    last = now
                if ev.error:
                    errors.append(ev.error)
                if now >= w.t_end:
                    break
            i += streams

    await _until(w.t_start)
    tasks = [asyncio.create_task(stream(j)) for j in range(streams)]
    await _until(w.t_end)
    await asyncio.wait(tasks, timeout=30)
    for t in tasks:
        t.cancel()
    return {"errors": errors[:3]}


async def http_streams(url: str, model: str, streams: int, prompt_len: int, new_tokens: int, w: Windows,
                       seed: int, id_hi: int = 8000) -> dict:
    """Closed loop through ``/v1/completions`` (stream, token-id prompts, ignore_eos); chunks are counted
    as tokens, then rescaled per request by the usage chunk (a chunk may carry several tokens)."""
    import aiohttp

    rng = random.Random(seed)
    errors: list[str] = []
    chunks_total = 0
    tokens_total = 0

    async def one(session) -> None:
        nonlocal chunks_total, tokens_total
        prompt = [rng.randrange(min(300, id_hi // 2), id_hi) for _ in range(prompt_len)]
        body = {"model": model, "prompt": prompt, "max_tokens": new_tokens, "temperature": 0,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        arrivals: list[float] = []
        usage = None
        async with session.post(url + "/v1/completions", json=body) as resp:
            if resp.status != 200:
                errors.append(f"HTTP {resp.status}")
                await asyncio.sleep(0.1)
                return
            async for raw in resp.content:
                line = raw.strip()
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                if b'"usage"' in line and b'"choices":[]' in line.replace(b" ", b""):
                    usage = json.loads(line[6:]).get("usage")
                    continue
                now = time.monotonic()
                w.add(now, 0, None if not arrivals else now - arrivals[-1])   # ITL sample
                arrivals.append(now)
                if now >= w.t_end:
                    break
        n = (usage or {}).get("completion_tokens") or len(arrivals)
        chunks_total += len(arrivals)
        tokens_total += n if usage else len(arrivals)
        per = n / len(arrivals) if arrivals and usage else 1.0
        for t in arrivals:
            k = int((t - w.t_start - w.warm_s) // w.window_s)
            if 0 <= k < w.reps:
                w.tokens[k] += per   # type: ignore[call-overload]

    async def stream(session) -> None:
        while time.monotonic() < w.t_end:
            try:
                await one(session)
            except Exception as exc:  # noqa: BLE001 - recorded, the loop goes on
                errors.append(f"{type(exc).__name__}: {exc}"[:200])
                await asyncio.sleep(0.1)

    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as s:
        await _until(w.t_start)
        tasks = [asyncio.create_task(stream(s)) for _ in range(streams)]
        await _until(w.t_end)
        await asyncio.wait(tasks, timeout=30)
        for t in tasks:
            t.cancel()
    return {"errors": errors[:3], "n_errors": len(errors), "chunks": chunks_total, "tokens": tokens_total}


# ----------------------------------------------------------------- the parent's side of an HTTP cell
def summarize(per_window: list[float], window_s: float) -> dict:
    tps = [t / window_s for t in per_window]
    return {"tokens_per_second_median": round(statistics.median(tps), 1), "tokens_per_second_min": round(min(tps), 1),
            "tokens_per_second_max": round(max(tps), 1), "tokens_per_second_windows": [round(x, 1) for x in tps]}


def engine_rates(a: tuple[float, ...] | None, b: tuple[float, ...] | None, seconds: float) -> dict:
    """The engine's own view of a span, from its (steps, generated tokens, prefill passes) counters at both
    ends: engine steps per second, generated tokens per step (about the mean batch; a step's prefilled first
    tokens count too) and prefill passes per second (each one runs between two decode steps and holds up the
    whole batch). In-process vs HTTP at one concurrency, they tell a slower step (fewer steps/s) from emptier
    batches (fewer tokens per step: slots idle between a request's end and the next one's admission) and from
    more, smaller prefills (arrivals spread out instead of admitted together). Through API workers the counters
    are as the engine last pushed them (every 0.5 s): over 30 s of windows that is within ~2 % at each end."""
    if a is None or b is None or seconds <= 0 or b[0] <= a[0]:
        return {}
    steps, tokens = b[0] - a[0], b[1] - a[1]
    res = {"engine_steps_per_second": round(steps / seconds, 1), "engine_tokens_per_step": round(tokens / steps, 2)}
    if len(a) > 2 and len(b) > 2:
        res["engine_prefills_per_second"] = round((b[2] - a[2]) / seconds, 1)
    return res


def scrape_engine_counters(url: str) -> tuple[float, ...] | None:
    """(steps, decode tokens[, prefill passes]) from a model server's /metrics (``model_server_engine_*``), or None."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(url + "/metrics", timeout=5) as r:   # noqa: S310 - 127.0.0.1 only
            text = r.read().decode()
    except OSError:
        return None
    got = {}
    names = ("model_server_engine_steps", "model_server_engine_decode_tokens", "model_server_engine_prefill_calls")
    for fam in text_string_to_metric_families(text):
        if fam.name in names:
            got[fam.name] = sum(s.value for s in fam.samples if s.name.endswith("_total"))
    if names[0] not in got or names[1] not in got:
        return None
    return tuple(got[n] for n in names if n in got)


def _scrape_at(url: str, when: float, out: list) -> None:
    time.sleep(max(0.0, when - time.monotonic()))
    out.append(scrape_engine_counters(url))


def pct_ms(xs: list[float], q: float) -> float | None:
    """The q-th percentile (0-100) of ``xs`` seconds, in ms (the benchmarks' one percentile)."""
    from support import percentile       # the benchmarks' one percentile (imported by the parent only)

    v = percentile(xs, q / 100)
    return None if v is None else round(v * 1e3, 4)


def cell_http(url: str, model: str, c: int, args, id_hi: int) -> dict:
    procs, n = [], max(1, -(-c // args.client_streams))
    t_start = time.monotonic() + 4.0          # client processes import aiohttp first
    cpu0, wall0 = resource.getrusage(resource.RUSAGE_CHILDREN), time.monotonic()   # finished children only
    for k in range(n):
        streams = c // n + (1 if k < c % n else 0)
        procs.append(subprocess.Popen([sys.executable, str(Path(__file__).resolve()), url, model,
                                       str(streams), str(args.prompt_len), str(args.new_tokens), str(t_start),
                                       str(args.warm_s), str(args.window_s), str(args.reps), str(k), str(id_hi)],
                                      stdout=subprocess.PIPE, text=True))
    # the engine's counters at the first window's start and the last one's end, scraped from this process
    import threading

    marks: list[list] = [[], []]
    t_end = t_start + args.warm_s + args.reps * args.window_s
    scrapers = [threading.Thread(target=_scrape_at, args=(url, at, out), daemon=True)
                for at, out in ((t_start + args.warm_s, marks[0]), (t_end, marks[1]))]
    for t in scrapers:
        t.start()
    outs = [json.loads(p.communicate(timeout=args.warm_s + args.reps * args.window_s + 90)[0].strip().splitlines()[-1])
            for p in procs]
    for t in scrapers:
        t.join(10)
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    busy = (cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime) / (n * (time.monotonic() - wall0))
    tokens = [sum(o["tokens_per_window"][i] for o in outs) for i in range(args.reps)]
    itl = [x for o in outs for x in o["itl"]]
    res = summarize(tokens, args.window_s)
    # mean CPU share of one core per client process over the cell (near 1.0: the load generator limits)
    res.update(concurrency=c, client_processes=n, client_cpu_per_process=round(busy, 3), itl_p50_ms=pct_ms(itl, 50), itl_p99_ms=pct_ms(itl, 99),
               errors=sum(o["n_errors"] for o in outs), error_samples=[e for o in outs for e in o["errors"]][:3],
               tokens_per_chunk=round(sum(o["tokens"] for o in outs) / max(1, sum(o["chunks"] for o in outs)), 3))
    res.update(engine_rates(marks[0][0] if marks[0] else None, marks[1][0] if marks[1] else None,
                            args.reps * args.window_s))
    return res


def main(argv: list[str]) -> int:
    url, model, streams, plen, new, t0, warm, win, reps, seed, id_hi = argv
    w = Windows(float(t0), float(warm), float(win), int(reps))
    res = asyncio.run(http_streams(url, model, int(streams), int(plen), int(new), w, int(seed), int(id_hi)))
    res.update(tokens_per_window=w.tokens, itl=w.itl[:20000])
    print(json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
