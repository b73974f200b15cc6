"""Proxy overhead: direct vs through edge-proxy vs through nginx, in one run, side by side.

A fast local upstream (aiohttp, its own process) answers OpenAI chat requests: streaming as SSE
(first token after ``--first-token-ms``, then one event every ``--token-interval-ms``) or as one
JSON body after the same total time. This script is the load generator (closed loop, ``C``
concurrent clients, aiohttp). Targets, each a separate process on 127.0.0.1:

- ``direct``: the upstream itself;
- ``edge-proxy``: ``edge-proxy serve`` with its defaults (energy auto, economics, access log to a file);
- ``edge-proxy core``: the same with ``--energy-source none`` (core instrumentation only) [--core-row];
- ``nginx``: Debian nginx as a plain reverse proxy (1 worker, upstream keepalive, proxy_buffering off).

For each (stream, concurrency) cell the targets run one after another (same cell back to back) for
``--seconds`` each. Reported: TTFT (time to the first SSE data bytes) and end-to-end latency p50/p99,
added latency = target percentile - direct percentile, throughput (requests completed inside the
measured windows per second) and the throughput ratio to direct by Little's law (concurrency / mean
end-to-end latency: window counts are quantized when the clients run in phase), and the target
process's CPU seconds per 1000 requests (from /proc; for ``direct`` that is the upstream's).

Noise-cancelled added latency (transit.py): the upstream stamps its own times per request, so each
request's transit (client-measured TTFT / e2e minus the upstream's own time to its first / last
write) leaves the upstream's sleep and scheduling jitter out; added = median transit(target) -
median transit(direct), pooled and per interleaved round (each round's own direct; the targets'
order rotates by one each round), with a 95% bootstrap interval, and the verdict "edge-proxy's added
p50 <= 2x nginx's": met, not met, or unresolved when the ranges overlap.

``--pin``: the targets on one CPU, the upstream and the load generator on the others (a proxy with a core of its own).

Usage: ``python benchmarks/proxy_overhead.py [--seconds 8] [--quick] [--pin] [--json OUT.json]``
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import transit
from fake_backend import run_upstream, start_edge_proxy, start_upstream
from nginx_target import NGINX, start_nginx
from support import child_pids, cpu_seconds, machine, pct, pin_targets_apart, stop_all, use_uvloop


@dataclass
class Target:
    name: str
    url: str
    proc: subprocess.Popen | None = None


@dataclass
class Cell:
    target: str
    stream: bool
    concurrency: int
    ttft: list[float] = field(default_factory=list)
    e2e: list[float] = field(default_factory=list)
    errors: int = 0
    completed: int = 0
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    # transit.py: per measured request, parallel to ttft / e2e (NaN when a response had no stamps)
    ttft_transit: list[float] = field(default_factory=list)
    e2e_transit: list[float] = field(default_factory=list)
    request_leg: list[float] = field(default_factory=list)
    round_ends: list[int] = field(default_factory=list)        # len(e2e) after each round
    ttft_round_ends: list[int] = field(default_factory=list)   # len(ttft) after each round
    unstamped: int = 0

    @property
    def rps(self) -> float:
        return self.completed / self.seconds if self.seconds else 0.0

    @property
    def closed_loop_rps(self) -> float:
        """Throughput by Little's law for a closed loop without think time: concurrency / mean
        end-to-end latency of the measured requests. Counting completions inside a window is
        quantized when every client is in phase (a window holds 7 or 8 rounds of 330 ms requests:
        +-12% at 2.5 s windows); this is not."""
        return self.concurrency / (sum(self.e2e) / len(self.e2e)) if self.e2e else 0.0


# ---- load generator -------------------------------------------------------------------------------
async def run_cell(url: str, stream: bool, conc: int, seconds: float, warmup: float, cell: Cell) -> None:
    import aiohttp

    body = json.dumps({"model": "bench", "messages": [{"role": "user", "content": "hi"}],
                       "max_tokens": 32, "stream": stream}).encode()
    headers = {"Content-Type": "application/json"}
    t_start = time.monotonic()
    t_measure = t_start + warmup
    t_stop = t_measure + seconds
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=60)) as s:
        async def worker() -> None:
            while True:
                t0 = time.monotonic()
                if t0 >= t_stop:
                    return
                ttft = t_first = None
                tail = b""
                try:
                    async with s.post(url, data=body, headers=headers) as r:
                        if r.status != 200:
                            raise RuntimeError(r.status)
                        stamps = r.headers.get(transit.STAMP_HEADER)
                        async for chunk in r.content.iter_any():
                            if ttft is None and b"data" in chunk:
                                t_first = time.monotonic()
                                ttft = t_first - t0
                            if stream:
                                tail = (tail + chunk)[-200:]
                    t1 = time.monotonic()
                except Exception:  # noqa: BLE001
                    if t0 >= t_measure:
                        cell.errors += 1
                    continue
                if t_measure <= t1 <= t_stop:
                    cell.completed += 1        # throughput: completions inside the window
                if t0 >= t_measure and t1 <= t_stop:
                    cell.e2e.append(t1 - t0)
                    got = transit.parse_stamps(tail if stream else stamps)
                    tr = transit.transit(t0, t_first, t1, got) if got else None
                    cell.unstamped += tr is None
                    cell.e2e_transit.append(tr.e2e if tr else math.nan)
                    cell.request_leg.append(tr.request_leg if tr else math.nan)
                    if stream and ttft is not None:
                        cell.ttft.append(ttft)
                        cell.ttft_transit.append(tr.ttft if tr and tr.ttft is not None else math.nan)
        await asyncio.gather(*(worker() for _ in range(conc)))
    cell.seconds = seconds


def main() -> int:
    use_uvloop()
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, help="measured seconds per target and cell, all rounds (12)")
    ap.add_argument("--warmup", type=float, help="unmeasured seconds before each measurement (0.5)")
    ap.add_argument("--rounds", type=int, help="targets interleaved in this many rounds per cell (4; --quick: 1)")
    ap.add_argument("--concurrency", help="levels (1,16,64)")
    ap.add_argument("--tokens", type=int, default=32, help="tokens per response")
    ap.add_argument("--first-token-ms", type=float, default=20.0)
    ap.add_argument("--token-interval-ms", type=float, default=10.0)
    ap.add_argument("--no-nginx", action="store_true")
    ap.add_argument("--nginx", default=NGINX, help="the nginx binary (default: Debian's)")
    ap.add_argument("--core-row", action="store_true", help="also run edge-proxy with --energy-source none")
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: defaults 1 s per cell, 0.3 s warm-up, concurrency 1,4, 1 round (flags given win)")
    ap.add_argument("--json", help="write raw results here")
    ap.add_argument("--pin", action="store_true",
                    help="the targets (proxies, nginx) on the first CPU, the upstream and this load generator on the "
                         "others: each proxy has a core of its own while it is measured")
    ap.add_argument("--upstream", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.upstream:
        # Default asyncio loop here: its timers have ns resolution (uvloop's are 1 ms), so the
        # upstream's token pacing adds no jitter of its own.
        asyncio.set_event_loop_policy(None)
        run_upstream(args.upstream, args.tokens, args.first_token_ms, args.token_interval_ms, stamp=True)
        return 0
    for name, normal, quick in (("seconds", 12.0, 1.0), ("warmup", 0.5, 0.3), ("concurrency", "1,16,64", "1,4"),
                                ("rounds", 4, 1)):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else normal)
    levels = [int(c) for c in args.concurrency.split(",")]

    procs: list[subprocess.Popen] = []
    tmp = Path(tempfile.mkdtemp(prefix="proxy-overhead-"))
    try:
        up, up_port = start_upstream(__file__, args.tokens, args.first_token_ms, args.token_interval_ms, procs)
        targets = [Target("direct", f"http://127.0.0.1:{up_port}", up)]

        def start_proxy(name: str, extra: list[str]) -> None:
            p, port = start_edge_proxy(up_port, tmp / f"{name.replace(' ', '_')}.jsonl", extra, procs)
            targets.append(Target(name, f"http://127.0.0.1:{port}", p))

        start_proxy("edge-proxy", [])
        if args.core_row:
            start_proxy("edge-proxy core", ["--energy-source", "none"])
        if not args.no_nginx:
            if not Path(args.nginx).exists():
                print(f"nginx not found at {args.nginx}; skipping it", file=sys.stderr)
            else:
                ng, nport = start_nginx(args.nginx, tmp, up_port, procs)
                targets.append(Target("nginx", f"http://127.0.0.1:{nport}", ng))

        if args.pin:
            err = pin_targets_apart([t.proc.pid for t in targets[1:] if t.proc is not None], [up.pid])
            if err:
                print(f"proxy_overhead: {err}", file=sys.stderr)
                return 2
        cells: list[Cell] = []
        try:
            from rich.progress import Progress
        except ImportError:  # pragma: no cover
            Progress = None  # type: ignore[assignment]
        # Rounds: every target runs seconds/rounds per round, targets interleaved (their order
        # rotated by one each round), so that load from other processes on the machine and drift
        # fall on all targets alike.
        plan = [(stream, c, r, t) for stream in (True, False) for c in levels
                for r in range(args.rounds) for t in targets[r % len(targets):] + targets[:r % len(targets)]]
        merged: dict[tuple[str, bool, int], Cell] = {}

        def one(stream: bool, c: int, t: Target) -> None:
            part = measure(t, stream, c, args)
            cell = merged.setdefault((t.name, stream, c), Cell(t.name, stream, c))
            cell.ttft += part.ttft
            cell.e2e += part.e2e
            cell.errors += part.errors
            cell.completed += part.completed
            cell.seconds += part.seconds
            cell.cpu_seconds += part.cpu_seconds
            cell.ttft_transit += part.ttft_transit
            cell.e2e_transit += part.e2e_transit
            cell.request_leg += part.request_leg
            cell.unstamped += part.unstamped
            cell.round_ends.append(len(cell.e2e))
            cell.ttft_round_ends.append(len(cell.ttft))
        if Progress is not None:
            with Progress(transient=True) as prog:
                task = prog.add_task("measuring", total=len(plan))
                for stream, c, _, t in plan:
                    one(stream, c, t)
                    prog.advance(task)
        else:
            for stream, c, _, t in plan:
                one(stream, c, t)
        cells = list(merged.values())
        report(cells, targets, args)
        summary = transit.report(cells)
        if args.json:
            Path(args.json).write_text(json.dumps(
                [{**c.__dict__, **summary.get((c.target, c.stream, c.concurrency), {})} for c in cells]))
        return 0
    finally:
        stop_all(procs)
        shutil.rmtree(tmp, ignore_errors=True)


def measure(t: Target, stream: bool, c: int, args: argparse.Namespace) -> Cell:
    cell = Cell(t.name, stream, c)
    pids = child_pids(t.proc.pid) if t.proc is not None else []
    cpu0 = cpu_seconds(pids)
    asyncio.run(run_cell(t.url + "/v1/chat/completions", stream, c, args.seconds / args.rounds,
                         args.warmup, cell))
    cell.cpu_seconds = cpu_seconds(pids) - cpu0
    return cell


def report(cells: list[Cell], targets: list[Target], args: argparse.Namespace) -> None:
    by = {(c.target, c.stream, c.concurrency): c for c in cells}
    ms = lambda x: f"{x * 1000:.2f}"  # noqa: E731
    print(f"\nmachine: {machine()}{'; --pin: targets on the first CPU' if args.pin else ''}")
    print(f"load generator event loop: {use_uvloop()}")
    print(f"upstream: {args.tokens} tokens, first token {args.first_token_ms:g} ms, then every "
          f"{args.token_interval_ms:g} ms; {args.seconds:g} s per target and cell in {args.rounds} interleaved "
          f"rounds, each after {args.warmup:g} s warm-up\n")
    print("| mode | conc | target | TTFT p50 ms | TTFT p99 ms | e2e p50 ms | e2e p99 ms | added TTFT p50/p99 ms "
          "| added e2e p50/p99 ms | req/s | throughput vs direct | errors | CPU ms/req (target process) |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for c in cells:
        d = by[("direct", c.stream, c.concurrency)]
        mode = "stream" if c.stream else "non-stream"
        if c.stream:
            tt = f"{ms(pct(c.ttft, .5))} | {ms(pct(c.ttft, .99))}"
            add_tt = ("-" if c.target == "direct" else
                      f"{ms(pct(c.ttft, .5) - pct(d.ttft, .5))} / {ms(pct(c.ttft, .99) - pct(d.ttft, .99))}")
        else:
            tt, add_tt = "- | -", "-"
        add_e2e = ("-" if c.target == "direct" else
                   f"{ms(pct(c.e2e, .5) - pct(d.e2e, .5))} / {ms(pct(c.e2e, .99) - pct(d.e2e, .99))}")
        ratio = f"{100 * c.closed_loop_rps / d.closed_loop_rps:.1f}%" if d.closed_loop_rps else "-"
        cpu = f"{1000 * c.cpu_seconds / max(1, c.completed):.3f}" + (" (upstream)" if c.target == "direct" else "")
        print(f"| {mode} | {c.concurrency} | {c.target} | {tt} | {ms(pct(c.e2e, .5))} | {ms(pct(c.e2e, .99))} | "
              f"{add_tt} | {add_e2e} | {c.rps:.1f} | {ratio} | {c.errors} | {cpu} |")


if __name__ == "__main__":
    raise SystemExit(main())
