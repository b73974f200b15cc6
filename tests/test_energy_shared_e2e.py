"""Two metering proxies on one host and one GPU counter (``--energy-shared``), real processes on
127.0.0.1: a fake streaming backend, two ``edge-proxy serve`` replaying the recorded H200 trace
from the shared table's creation (the same counter for both), openai clients.

Load through A alone, then through both: the two proxies' GPU energy counters add up to the
trace's energy over the same time (each joule once, not twice), B is charged nothing while only A
has requests, and with equal load they are charged alike.
"""
from __future__ import annotations

import asyncio
import bisect
import json
import subprocess
import sys
import time
from pathlib import Path

import openai

from edge_proxy.energy.shared_table import HEADER
from tests.net_support import free_port, stop_process, wait_http_ok
from tests.test_deploy_gateways_energy import TRACE, proxy, scrape, total

ROOT = Path(__file__).resolve().parents[1]


def trace_counter_j(created_ns: int) -> "callable":
    """Counter of the looping replay at monotonic time t (J), linear between records."""
    rows = [json.loads(x) for x in TRACE.read_text().splitlines() if x.strip()]
    recs = [(r["t"], sum(r["energy_millijoules"].values()) / 1000) for r in rows if "energy_millijoules" in r]
    ts = [t for t, _ in recs]

    def at(t_ns: int) -> float:
        t = (t_ns - created_ns) / 1e9 + ts[0]
        assert t < ts[-1], "the test outlived one loop of the trace"
        i = max(1, bisect.bisect_right(ts, t))
        (t0, e0), (t1, e1) = recs[i - 1], recs[i]
        return e0 + (e1 - e0) * (t - t0) / (t1 - t0)
    return at


async def streams(url: str, seconds: float, concurrency: int) -> int:
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=30)
    done = 0
    stop = time.monotonic() + seconds

    async def worker() -> None:
        nonlocal done
        while time.monotonic() < stop:
            s = await client.chat.completions.create(model="bench", max_tokens=10, stream=True,
                                                     messages=[{"role": "user", "content": "hi"}])
            async for _ in s:
                pass
            done += 1
    try:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    finally:
        await client.close()
    return done


def energies(mets: dict[str, str]) -> dict[str, tuple[float, float]]:
    """name -> (GPU energy counter, energy charged to requests) in J."""
    out = {}
    for name, murl in mets.items():
        f = scrape(murl)
        out[name] = (total(f, "edge_proxy_gpu_energy_joules"), total(f, "edge_proxy_attributed_full_energy_joules"))
    return out


def test_two_proxies_on_one_counter_count_each_joule_once(tmp_path: Path) -> None:
    port = free_port()
    up = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "energy_load.py"), "--upstream", str(port),
                           "--tokens", "10", "--first-token-ms", "50", "--token-interval-ms", "50"])
    try:
        wait_http_ok(f"http://127.0.0.1:{port}/health", timeout=30, proc=up)
        table = tmp_path / "gpu0.activity"
        args = ("--backend", f"http://127.0.0.1:{port}", "--energy-source", "replay", "--energy-replay",
                str(TRACE), "--energy-period", "0.05", "--energy-shared", str(table))
        with proxy(tmp_path, "a", *args) as a, proxy(tmp_path, "b", *args) as b:
            created_ns = HEADER.unpack_from(table.read_bytes(), 0)[3]
            counter = trace_counter_j(created_ns)
            mets = {"a": a[1], "b": b[1]}
            time.sleep(1.0)
            m0, e0 = time.monotonic_ns(), energies(mets)
            n1 = asyncio.run(streams(a[0], 3.0, 4))                       # A alone
            time.sleep(0.5)
            m1, e1 = time.monotonic_ns(), energies(mets)

            async def both() -> list[int]:
                return list(await asyncio.gather(streams(a[0], 3.0, 4), streams(b[0], 3.0, 4)))
            n2 = asyncio.run(both())
            time.sleep(0.5)
            m2, e2 = time.monotonic_ns(), energies(mets)
    finally:
        stop_process(up)
    assert n1 > 0 and min(n2) > 0
    gpu = {k: e2[k][0] - e0[k][0] for k in e0}
    real = counter(m2) - counter(m0)
    # each joule once: the two counters add up to the GPU's (two unshared proxies would give ~2x)
    assert abs(sum(gpu.values()) / real - 1) < 0.10, (gpu, real)
    # A alone: B is charged nothing; its counter moves only by half the idle edges (the 0.5 s settle,
    # gaps between A's streams), A's by the rest
    charged_1 = {k: e1[k][1] - e0[k][1] for k in e0}
    gpu_1 = {k: e1[k][0] - e0[k][0] for k in e0}
    assert charged_1["a"] > 0 and charged_1["b"] < 0.02 * charged_1["a"], charged_1
    assert gpu_1["b"] < 0.2 * gpu_1["a"], gpu_1
    assert abs((gpu_1["a"] + gpu_1["b"]) / (counter(m1) - counter(m0)) - 1) < 0.10
    # equal load: charged alike
    charged_2 = {k: e2[k][1] - e1[k][1] for k in e0}
    assert 0.6 < charged_2["a"] / charged_2["b"] < 1.67, charged_2


def test_two_proxies_on_one_port_share_the_connections_and_the_counter(tmp_path: Path) -> None:
    """``--reuse-port``: two processes listen on one port (without it the second cannot bind); the
    kernel spreads new connections over them, and each meters what it served."""
    import urllib.request

    port, up_port = free_port(), free_port()
    up = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "energy_load.py"), "--upstream", str(up_port),
                           "--tokens", "3", "--first-token-ms", "10", "--token-interval-ms", "10"])
    procs: list[subprocess.Popen] = []
    try:
        wait_http_ok(f"http://127.0.0.1:{up_port}/health", timeout=30, proc=up)
        mports = [free_port(), free_port()]
        for i, mport in enumerate(mports):
            err = open(tmp_path / f"p{i}.stderr", "w")
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "edge_proxy", "serve", "--host", "127.0.0.1", "--port", str(port),
                 "--reuse-port", "--metrics-port", str(mport), "--access-log", "none",
                 "--backend", f"http://127.0.0.1:{up_port}", "--energy-source", "replay", "--energy-replay",
                 str(TRACE), "--energy-period", "0.05", "--energy-shared", str(tmp_path / "t")],
                stdout=err, stderr=err))
            wait_http_ok(f"http://127.0.0.1:{mport}/healthz", timeout=30, proc=procs[-1])
        body = json.dumps({"model": "bench", "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]})
        for _ in range(40):                  # a new connection each (urllib): the kernel picks a process
            req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body.encode(),
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=10) as r:
                assert r.status == 200
        time.sleep(1.0)
        served, charged = [], []
        for mport in mports:
            f = scrape(f"http://127.0.0.1:{mport}")
            served.append(sum(s.value for s in f["edge_proxy_requests"] if s.name == "edge_proxy_requests_total"))
            charged.append(total(f, "edge_proxy_attributed_full_energy_joules"))
    finally:
        for p in procs:
            stop_process(p)
        stop_process(up)
    assert sum(served) == 40 and min(served) >= 1, served
    assert min(charged) > 0, charged
