"""Energy sampler tick cost: CPU microseconds per tick of the real sampler + ledger + estimated source
(built as the proxy builds them: ``edge_proxy.energy.factory.create_energy``), by phase, with N
requests open (issue 17: the default row's per-second cost).

A real backend process tree is spawned (a python process listening on a TCP port, with a few
threads that wake every few ms and a child process of its own), so the estimated source finds it by
its port and reads its process tree as it does in front of a real server. An asyncio loop in the
main thread plays the proxy's part: N closed-loop clients, each request ``--first-token-ms`` to its
first token and then one token every ``--token-interval-ms`` (``--tokens`` in all), fed to the
energy observer as the proxy's bookkeeping feeds it (streams: the token list plus a call for the
first token, the prompt count with the end, as OpenAI usage comes last; non-streaming: the count
at the end), each request finalized through ``finalize_soon``. The sampler runs on its own thread
at the configured period.

Reported per tick: all the CPU time of the sampler thread (the scheduler's count: wake-ups and
waits for the GIL included), then by phase (``time.thread_time_ns`` around each): the whole step, the
source read, the sampler's own ingest, and inside the ledger's tick: draining the queued request
events, splitting and finality (``core.process``), the publish of the totals and the rest (the
final-notice to the observer, the foreign check). Per request on the event loop: the observer's
start, end and finalize calls (including settling the request when its tick is split; the
per-token calls are left out: timing each would cost more than the call).
Also once: one Prometheus scrape of the energy collector (per scrape, not per tick).

Usage: ``python benchmarks/sampler_tick_cost.py [--seconds 8] [--open 0,16,64,256] [--back-to-back N] [--json OUT]``
"""
from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest

from edge_proxy.config import Settings
from edge_proxy.energy.exporter import EnergyCollector
from edge_proxy.energy.factory import create_energy
from edge_proxy.proxy.bookkeeping import Bookkeeping
from edge_proxy.proxy.hooks import RequestRecord
from edge_proxy.telemetry.metrics import ProxyMetrics

BACKEND = r"""
import os, socket, subprocess, sys, threading, time
s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen(16)
kid = subprocess.Popen([sys.executable, "-c", "import time\nwhile True:\n sum(range(200)); time.sleep(0.005)"])
def work(ms):
    while True:
        sum(range(300)); time.sleep(ms / 1000)
for ms in (2, 5, 10, 20):
    threading.Thread(target=work, args=(ms,), daemon=True).start()
print(s.getsockname()[1], flush=True)
try:
    sys.stdin.read()
finally:
    kid.kill()
"""


def spawn_backend() -> tuple[subprocess.Popen[str], int]:
    """The backend tree (a listener with 4 threads and one child); its port."""
    p = subprocess.Popen([sys.executable, "-c", BACKEND], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert p.stdout is not None
    return p, int(p.stdout.readline())


class Phases:
    """CPU nanoseconds (``time.thread_time_ns``) and calls per named wrapped callable."""

    def __init__(self) -> None:
        self.ns: dict[str, int] = {}
        self.calls: dict[str, int] = {}

    def wrap(self, obj: Any, attr: str, name: str) -> bool:
        """Replace ``obj.attr`` (a bound method) by a timed one; False when it has no such attribute."""
        fn = getattr(obj, attr, None)
        if fn is None:
            return False
        clock = time.thread_time_ns
        ns, calls = self.ns, self.calls
        ns.setdefault(name, 0)
        calls.setdefault(name, 0)

        def timed(*a: Any, **k: Any) -> Any:
            t = clock()
            try:
                return fn(*a, **k)
            finally:
                ns[name] += clock() - t
                calls[name] += 1
        setattr(obj, attr, timed)
        return True

    def reset(self) -> None:
        for k in self.ns:
            self.ns[k] = 0
            self.calls[k] = 0


@dataclass
class Client:
    rec: RequestRecord | None = None
    t0: int = 0
    sent: int = 0


@dataclass
class Result:
    open: int
    stream: bool
    ticks: int
    requests: int
    seconds: float
    tick_us: dict[str, float] = field(default_factory=dict)
    loop_us_per_request: dict[str, float] = field(default_factory=dict)


def thread_cpu_ns(sampler: Any) -> int:
    """CPU time of the sampler's thread so far (ns): the scheduler's own count
    (``/proc/self/task/TID/schedstat``), so the thread's wake-ups and GIL waits outside ``step``
    are in it too."""
    tid = sampler._thread.native_id
    with open(f"/proc/self/task/{tid}/schedstat") as f:
        return int(f.read().split()[0])


def build(port: int) -> Any:
    s = Settings()
    s.proxy.backend_url = f"http://127.0.0.1:{port}"
    s.energy.source = "estimated"            # what "auto" picks on a machine without NVML
    comp = create_energy(s, CollectorRegistry())
    assert comp is not None
    return comp


def instrument(comp: Any, tick: Phases, loop: Phases) -> None:
    """Timed wrappers, installed before the sampler starts (its listener is then the wrapper)."""
    smp, led = comp.sampler, comp.ledger
    tick.wrap(smp, "step", "step")
    tick.wrap(smp.reader, "read", "read")
    tick.wrap(led, "add_tick", "ledger")
    tick.wrap(led, "_drain", "drain")
    tick.wrap(led._core, "process", "split+finality")
    tick.wrap(led._core.totals, "copy", "publish")
    tick.wrap(led, "_notify_final", "notify")
    obs = comp.observer
    for attr in ("on_request_start", "on_request_end", "finalize_soon", "_wake_final", "_sweep"):
        loop.wrap(obs, attr, attr)


async def drive(comp: Any, n_open: int, stream: bool, seconds: float, warmup: float, args: argparse.Namespace,
                tick: Phases, loop_ph: Phases) -> Result:
    obs = comp.observer
    tokens = Bookkeeping(ProxyMetrics(CollectorRegistry()), [obs], []).tokens
    first_ns = int(args.first_token_ms * 1e6)
    every_ns = int(args.token_interval_ms * 1e6)
    n_tok = args.tokens
    clients = [Client() for _ in range(n_open)]
    seq = 0
    done = 0
    measuring = False

    def finished(rec: RequestRecord) -> None:
        nonlocal done
        if measuring:
            done += 1

    def start(c: Client, now: int) -> None:
        nonlocal seq
        seq += 1
        rec = RequestRecord(request_id=f"r{seq}", route="/v1/chat/completions", api="openai", operation="chat",
                            model="bench", stream=stream, t_received_ns=now)
        rec.t_forwarded_ns = now
        obs.on_request_start(rec)
        c.rec, c.t0, c.sent = rec, now, 0

    t_end = time.monotonic() + warmup + seconds
    t_measure = time.monotonic() + warmup
    while True:
        now_s = time.monotonic()
        if not measuring and now_s >= t_measure:
            measuring = True
            tick.reset()
            loop_ph.reset()
            t_meas_ns = time.monotonic_ns()
            thread0 = thread_cpu_ns(comp.sampler)
        if now_s >= t_end:
            break
        now = time.monotonic_ns()
        for c in clients:
            if c.rec is None:
                start(c, now)
                continue
            rec = c.rec
            el = now - c.t0
            due = 0 if el < first_ns else min(n_tok, (el - first_ns) // every_ns + 1)
            if stream:
                while c.sent < due:           # the proxy's own dispatch: the token list, then the observers
                    c.sent += 1
                    tokens(rec, 1, now)
            if due >= n_tok:
                rec.input_tokens, rec.output_tokens = 12, n_tok      # usage comes last
                if not stream:                # account_whole: the body's counts, then the observers
                    obs.on_tokens(rec, n_tok, now)
                rec.t_end_ns = now
                obs.on_request_end(rec)
                obs.finalize_soon(rec, finished)
                start(c, now)
        await asyncio.sleep(0.002)
    elapsed = (time.monotonic_ns() - t_meas_ns) / 1e9
    thread_ns = thread_cpu_ns(comp.sampler) - thread0
    ticks = max(1, tick.calls.get("step", 0))
    ns = dict(tick.ns)
    out = {k: v / ticks / 1000 for k, v in ns.items()}
    # exclusive parts: step = read + ingest (incl. the ledger); ledger = drain + split + publish + rest
    out["ingest (sampler own)"] = (ns["step"] - ns["read"] - ns["ledger"]) / ticks / 1000
    out["thread"] = thread_ns / ticks / 1000       # everything the thread ran, waits and wake-ups included
    out["ledger rest"] = (ns["ledger"] - ns["drain"] - ns["split+finality"] - ns.get("publish", 0)
                          - ns.get("notify", 0)) / ticks / 1000
    per_req = {k: v / max(1, done) / 1000 for k, v in loop_ph.ns.items()}
    per_req["total"] = sum(loop_ph.ns.values()) / max(1, done) / 1000
    return Result(n_open, stream, tick.calls.get("step", 0), done, elapsed, out, per_req)


def run_one(port: int, n_open: int, stream: bool, args: argparse.Namespace) -> tuple[Result, float]:
    comp = build(port)
    tick, loop_ph = Phases(), Phases()
    instrument(comp, tick, loop_ph)
    comp.start()
    try:
        res = asyncio.run(drive(comp, n_open, stream, args.seconds, args.warmup, args, tick, loop_ph))
    finally:
        comp.stop()
    reg = CollectorRegistry()
    reg.register(EnergyCollector(comp.ledger, comp.sampler))
    t = time.thread_time_ns()
    for _ in range(20):
        generate_latest(reg)
    scrape_us = (time.thread_time_ns() - t) / 20 / 1000
    return res, scrape_us


def back_to_back_us(port: int, calls: int) -> float:
    """CPU us per ``Sampler.step()`` called ``calls`` times in a row on this thread, no request open (the source
    read, the ingest, the ledger's tick): the same work as a tick, on a warm CPU instead of once per period."""
    comp = build(port)
    comp.sampler.add_listener(comp.ledger.add_tick)        # as the energy component's start() does, no thread
    for _ in range(20):
        comp.sampler.step()
        time.sleep(0.01)
    t = time.thread_time_ns()
    for _ in range(calls):
        comp.sampler.step()
    return (time.thread_time_ns() - t) / calls / 1000


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=8.0, help="measured seconds per cell (8)")
    ap.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds first (2)")
    ap.add_argument("--open", default="0,16,64,256", help="requests open at once (0,16,64,256)")
    ap.add_argument("--modes", default="stream,non-stream")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--first-token-ms", type=float, default=20.0)
    ap.add_argument("--token-interval-ms", type=float, default=10.0)
    ap.add_argument("--back-to-back", type=int, default=0, metavar="N",
                    help="also time N sampler steps called in a row with nothing open (0: no)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    backend, port = spawn_backend()
    results: list[dict[str, Any]] = []
    try:
        time.sleep(0.3)
        print(f"backend tree: pid {backend.pid} on port {port}; python {sys.version.split()[0]}; "
              f"commit {git_commit()}; edge_proxy from {Path(__import__('edge_proxy').__file__).parent}")
        cols = ["thread", "step", "read", "ingest (sampler own)", "drain", "split+finality", "publish", "notify", "ledger rest"]
        print("\nCPU us per tick (sampler thread) | event loop CPU us per request (observer calls)\n")
        print("| mode | open | ticks | req | " + " | ".join(cols) + " | loop us/req | scrape us |")
        print("|---|---:|---:|---:|" + "---:|" * len(cols) + "---:|---:|")
        for mode in args.modes.split(","):
            for n in [int(x) for x in args.open.split(",")]:
                res, scrape = run_one(port, n, mode == "stream", args)
                vals = " | ".join(f"{res.tick_us.get(c, float('nan')):.1f}" for c in cols)
                print(f"| {mode} | {n} | {res.ticks} | {res.requests} | {vals} | "
                      f"{res.loop_us_per_request['total']:.1f} | {scrape:.0f} |", flush=True)
                results.append({**res.__dict__, "scrape_us": scrape})
        b2b = back_to_back_us(port, args.back_to_back) if args.back_to_back > 0 else None
        if b2b is not None:
            print(f"\nback to back, nothing open: {b2b:.1f} us per step ({args.back_to_back} steps)")
    finally:
        if backend.stdin:
            backend.stdin.close()
        backend.wait(5)
    if args.json:
        Path(args.json).write_text(json.dumps({"commit": git_commit(), "args": vars(args), "results": results,
                                               "back_to_back_step_us": b2b}, indent=1))
    return 0


def git_commit() -> str:
    import edge_proxy
    where = Path(edge_proxy.__file__).resolve().parents[1]
    try:
        return subprocess.run(["git", "-C", str(where), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


if __name__ == "__main__":
    raise SystemExit(main())
