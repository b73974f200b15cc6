"""Energy ledger under load: the proxy with `--energy-source none`, `estimated` and `replay`, side by side.

A fake fast streaming backend (aiohttp, its own process) answers OpenAI chat requests with
``--tokens`` SSE events, one every ``--token-interval-ms`` (first after ``--first-token-ms``), and the
usage chunk last (like vLLM: the prompt-token count is known only at the end, the ledger's hardest
case). One proxy per energy source runs in its own process (``edge-proxy serve``, defaults otherwise;
``replay`` replays ``--trace``, by default the H200 trace recorded in ``tests/data``). This script is
the load generator: ``C`` closed-loop streaming clients (aiohttp) for ``--seconds`` per target after a
warm-up, the targets interleaved in ``--rounds`` rounds so that other load on the machine falls on all
alike. Meanwhile it scrapes the proxy's ``/metrics`` every second (time per scrape) and probes the
proxy's event loop every 20 ms with a request its metrics server answers at once (a 404): the
probe's latency bounds how long the loop stalled.

Reported per target: requests/s (completions inside the measured windows), stream end-to-end p50/p99,
errors, max /metrics scrape time, max and p99.9 loop-probe latency (which includes this load
generator's own loop delay), the proxy's own loop lag (``edge_proxy_event_loop_lag_seconds`` over the
measured windows: timer runs later than 50 ms, worst bucket), the proxy process's CPU (cores, from
/proc over the same windows), and the ratios to ``none``. ``--pin``
puts the proxies on CPU 0 and everything else on the other CPUs.

A source with ``-xN`` (N = 2..8, e.g. ``replay-x2``) runs N proxy processes, the clients split evenly over
them; with a source they share one GPU counter through an activity table (``--energy-shared``), so
each meters its own share. Loop lag, GC pauses and CPU are then summed over the N.

Usage: ``python benchmarks/energy_load.py [--concurrency 1000] [--seconds 30] [--json OUT.json]``
"""
from __future__ import annotations

import argparse
import asyncio
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from fake_backend import run_upstream, start_edge_proxy, start_upstream
from support import ROOT, cpu_seconds, free_port, pct, pin_proxies, stop_all

TRACE = ROOT / "tests" / "data" / "energy_h200_recorded.jsonl"
SOURCES = ("none", "estimated", "replay")          # each also as SOURCE-xN: N processes (2..8)


def split_target(target: str) -> tuple[str, int] | None:
    """``replay-x3`` -> ("replay", 3); ``none`` -> ("none", 1); None when it is not a target."""
    base, sep, n = target.rpartition("-x")     # N processes: 2..8
    if sep and n.isdigit() and 2 <= int(n) <= 8 and base in SOURCES:
        return base, int(n)
    return (target, 1) if target in SOURCES else None


@dataclass
class Result:
    source: str
    concurrency: int
    seconds: float = 0.0
    completed: int = 0
    errors: int = 0
    e2e: list[float] = field(default_factory=list)
    scrape_seconds: list[float] = field(default_factory=list)
    scrape_failures: int = 0
    probe_seconds: list[float] = field(default_factory=list)
    lag_buckets: dict[str, float] = field(default_factory=dict)   # the proxy's own loop lag, measured windows
    gc_buckets: dict[str, float] = field(default_factory=dict)    # the proxy's GC pauses, measured windows
    proxy_cpu_seconds: float = 0.0                                 # the proxy process's CPU, measured windows

    @property
    def rps(self) -> float:
        return self.completed / self.seconds if self.seconds else 0.0

    def summary(self) -> dict[str, float | int | str]:
        return {"source": self.source, "concurrency": self.concurrency, "seconds": self.seconds,
                "requests_per_second": self.rps, "completed": self.completed, "errors": self.errors,
                "stream_p50_seconds": pct(self.e2e, 0.5), "stream_p99_seconds": pct(self.e2e, 0.99),
                "scrape_max_seconds": max(self.scrape_seconds, default=float("nan")),
                "scrapes": len(self.scrape_seconds), "scrape_failures": self.scrape_failures,
                "loop_probe_max_seconds": max(self.probe_seconds, default=float("nan")),
                "loop_probe_p999_seconds": pct(self.probe_seconds, 0.999), "probes": len(self.probe_seconds),
                "proxy_cores": self.proxy_cpu_seconds / self.seconds if self.seconds else float("nan"),
                **lag_summary(self.lag_buckets), **lag_summary(self.gc_buckets, "gc")}


LAG = "edge_proxy_event_loop_lag_seconds"
GC = "edge_proxy_gc_pause_seconds"


def lag_buckets(text: str, name: str = LAG) -> dict[str, float]:
    """Cumulative bucket counts (le -> count) of histogram ``name`` in a scrape, summed over its
    label sets (the GC histogram's generations)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(text):
        if fam.name == name:
            for s in fam.samples:
                if s.name.endswith("_bucket"):
                    out[s.labels["le"]] = out.get(s.labels["le"], 0.0) + s.value
    return out


def lag_summary(buckets: dict[str, float], key: str = "loop_lag") -> dict[str, float | None]:
    """From a proxy histogram over the measured windows (loop lag, or GC pauses with key="gc"):
    observations, observations above 50 ms, and the upper bound of the highest non-empty bucket
    (the worst stall, to the bucket)."""
    if not buckets:
        return {f"{key}_runs": 0, f"{key}_over_50ms": None, f"{key}_max_bucket_seconds": None}
    les = sorted(buckets, key=float)
    total = buckets["+Inf"]
    worst, prev = None, 0.0
    for le in les:
        if buckets[le] > prev:
            worst = float(le)
        prev = buckets[le]
    return {f"{key}_runs": total, f"{key}_over_50ms": total - buckets.get("0.05", 0.0),
            f"{key}_max_bucket_seconds": worst}


async def run_round(procs: list[tuple[str, str, int]], conc: int, seconds: float, warmup: float,
                    res: Result) -> None:
    """One measured window against the target's proxies: (url, metrics url, pid) each."""
    import aiohttp

    body = json.dumps({"model": "bench", "messages": [{"role": "user", "content": "hi"}],
                       "max_tokens": 64, "stream": True}).encode()
    headers = {"Content-Type": "application/json"}
    t_measure = time.monotonic() + warmup
    t_stop = t_measure + seconds
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=120)) as s, \
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as side:
        async def worker(url: str) -> None:
            while (t0 := time.monotonic()) < t_stop:
                try:
                    async with s.post(url, data=body, headers=headers) as r:
                        if r.status != 200:
                            raise RuntimeError(r.status)
                        async for _ in r.content.iter_any():
                            pass
                    t1 = time.monotonic()
                except Exception:  # noqa: BLE001
                    if t0 >= t_measure:
                        res.errors += 1
                    await asyncio.sleep(0.05)
                    continue
                if t_measure <= t1 <= t_stop:
                    res.completed += 1
                    res.e2e.append(t1 - t0)

        async def scraper(metrics: str) -> None:
            while time.monotonic() < t_stop:
                await asyncio.sleep(1.0)
                t0 = time.monotonic()
                try:
                    async with side.get(metrics) as r:
                        await r.read()
                    if t0 >= t_measure:
                        res.scrape_seconds.append(time.monotonic() - t0)
                except Exception:  # noqa: BLE001 - a timeout (10 s) is a failure
                    res.scrape_failures += 1

        async def window_ends(metrics: str, pid: int) -> tuple[dict[str, float], dict[str, float], float]:
            async with side.get(metrics, timeout=aiohttp.ClientTimeout(total=30)) as r:
                text = await r.text()       # lag, GC, CPU
                return lag_buckets(text), lag_buckets(text, GC), cpu_seconds([pid])

        async def lag_window(metrics: str, pid: int) -> None:   # a proxy's histograms and CPU at both ends
            await asyncio.sleep(max(0.0, t_measure - time.monotonic()))
            before, gc0, cpu0 = await window_ends(metrics, pid)
            await asyncio.sleep(max(0.0, t_stop - time.monotonic()))
            after, gc1, cpu1 = await window_ends(metrics, pid)
            res.proxy_cpu_seconds += cpu1 - cpu0
            for le, n in after.items():
                res.lag_buckets[le] = res.lag_buckets.get(le, 0.0) + n - before.get(le, 0.0)
            for le, n in gc1.items():
                res.gc_buckets[le] = res.gc_buckets.get(le, 0.0) + n - gc0.get(le, 0.0)

        async def prober(metrics: str) -> None:
            probe = metrics.rsplit("/", 1)[0] + "/edge-loop-probe"   # 404 from the proxy's loop
            while time.monotonic() < t_stop:
                await asyncio.sleep(0.02)
                t0 = time.monotonic()
                try:
                    async with side.get(probe) as r:
                        await r.read()
                except Exception:  # noqa: BLE001
                    pass
                if t0 >= t_measure:
                    res.probe_seconds.append(time.monotonic() - t0)

        await asyncio.gather(*(worker(procs[i % len(procs)][0]) for i in range(conc)),
                             *(scraper(m) for _, m, _ in procs), *(prober(m) for _, m, _ in procs),
                             *(lag_window(m, pid) for _, m, pid in procs))
    res.seconds += seconds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--concurrency", type=int, default=1000, help="concurrent streams (default 1000)")
    ap.add_argument("--seconds", type=float, default=30.0, help="measured seconds per target, all rounds (default 30)")
    ap.add_argument("--rounds", type=int, default=3, help="targets interleaved in this many rounds (default 3)")
    ap.add_argument("--warmup", type=float, default=3.0, help="unmeasured seconds before each round (default 3)")
    ap.add_argument("--tokens", type=int, default=16, help="tokens per stream (default 16)")
    ap.add_argument("--first-token-ms", type=float, default=100.0)
    ap.add_argument("--token-interval-ms", type=float, default=100.0)
    ap.add_argument("--sources", default="none,estimated,replay",
                    help="targets to compare, none first (default none,estimated,replay; each also as "
                         "SOURCE-xN, N processes sharing the counter, e.g. replay-x2)")
    ap.add_argument("--trace", default=str(TRACE), help="replay trace (default: the recorded H200 trace)")
    ap.add_argument("--json", help="write raw results (summaries and samples) here")
    ap.add_argument("--pin", action="store_true",
                    help="pin the proxies to CPU 0 (with N+2 CPUs or more: a -xN target's N to CPUs 0..N-1) and this "
                         "load generator and the backend to the others (separates the proxy's own stalls from "
                         "CPU contention)")
    ap.add_argument("--upstream", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.upstream:
        # usage last and no x-prompt-tokens header: the prompt-token count is known only at the end
        run_upstream(args.upstream, args.tokens, args.first_token_ms, args.token_interval_ms,
                     prompt_header=False, backlog=4096)
        return 0
    sources = [s for s in args.sources.split(",") if s]
    bad = [s for s in sources if split_target(s) is None]
    if bad or not sources:
        print(f"energy_load: error: --sources takes {', '.join(SOURCES)} (each also as SOURCE-xN, N = 2..8), "
              f"got {args.sources!r}", file=sys.stderr)
        return 2
    if any(split_target(s)[0] == "replay" for s in sources) and not Path(args.trace).is_file():  # type: ignore[index]
        print(f"energy_load: error: replay trace not found: {args.trace}", file=sys.stderr)
        return 2
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, max(soft, 4 * args.concurrency + 1024))
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))     # children inherit it
    procs: list[subprocess.Popen] = []
    tmp = Path(tempfile.mkdtemp(prefix="energy-load-"))
    try:
        _, up_port = start_upstream(__file__, args.tokens, args.first_token_ms, args.token_interval_ms, procs)
        targets: dict[str, list[tuple[str, str, int]]] = {}
        for src in sources:
            base, n = split_target(src)  # type: ignore[misc]
            extra = ["--energy-source", base] + (["--energy-replay", args.trace] if base == "replay" else [])
            if n > 1 and base != "none":
                extra += ["--energy-shared", str(tmp / f"{src}.activity")]
            targets[src] = []
            for i in range(n):
                mport = free_port()
                proxy, port = start_edge_proxy(up_port, tmp / f"{src}-{i}.jsonl", extra, procs, metrics_port=mport)
                targets[src].append((f"http://127.0.0.1:{port}/v1/chat/completions",
                                     f"http://127.0.0.1:{mport}/metrics", proxy.pid))
        if args.pin:
            err = pin_proxies(procs, [[pid for _, _, pid in t] for t in targets.values()])
            if err:
                print(f"energy_load: error: {err}", file=sys.stderr)
                return 2
        results = {s: Result(s, args.concurrency) for s in sources}
        from rich.progress import Progress
        with Progress(transient=True) as prog:
            task = prog.add_task("measuring", total=args.rounds * len(sources))
            for _ in range(args.rounds):
                for src in sources:
                    asyncio.run(run_round(targets[src], args.concurrency, args.seconds / args.rounds,
                                          args.warmup, results[src]))
                    prog.advance(task)
                    time.sleep(2.0)      # the previous target's streams and finalizes settle
        report(results, args)
        if args.json:
            Path(args.json).write_text(json.dumps({
                "args": {k: v for k, v in vars(args).items() if k != "upstream"},
                "summaries": [r.summary() for r in results.values()],
                "raw": [asdict(r) for r in results.values()]}, separators=(",", ":")) + "\n")
        return 0
    finally:
        stop_all(procs)
        shutil.rmtree(tmp, ignore_errors=True)


def report(results: dict[str, Result], args: argparse.Namespace) -> None:
    base = results.get("none")
    print(f"\n{args.concurrency} concurrent streams of {args.tokens} tokens (first after {args.first_token_ms:g} ms, "
          f"then every {args.token_interval_ms:g} ms; usage last), {args.seconds:g} s per target in {args.rounds} "
          f"interleaved rounds\n")
    print("| energy source | req/s | vs none | stream p50 s | stream p99 s | p99 vs none | errors "
          "| max /metrics s | max loop probe s | p99.9 loop probe s | proxy loop lags > 50 ms | worst lag bucket s "
          "| GC pauses > 50 ms | worst GC bucket s | proxy CPU cores |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results.values():
        s = r.summary()
        ratio = f"{r.rps / base.rps:.3f}" if base and base.rps else "-"
        p99r = f"{s['stream_p99_seconds'] / base.summary()['stream_p99_seconds']:.3f}" if base and base.e2e else "-"
        print(f"| {r.source} | {r.rps:.1f} | {ratio} | {s['stream_p50_seconds']:.3f} | {s['stream_p99_seconds']:.3f} "
              f"| {p99r} | {r.errors} | {s['scrape_max_seconds']:.3f} | {s['loop_probe_max_seconds']:.3f} "
              f"| {s['loop_probe_p999_seconds']:.3f} | {s['loop_lag_over_50ms']} of {s['loop_lag_runs']:.0f} "
              f"| {s['loop_lag_max_bucket_seconds']} | {s['gc_over_50ms']} of {s['gc_runs']:.0f} "
              f"| {s['gc_max_bucket_seconds']} | {s['proxy_cores']:.2f} |")


if __name__ == "__main__":
    sys.exit(main())
