"""Reliability of the processes under faults (issue 19), side by side with an older checkout.

Scenarios, each run against this checkout and (``--baseline DIR``) another one, on 127.0.0.1:

- ``big_prompt``: one huge prompt (1, 3.6, 10 MB) to the model server (tiny preset, CPU) while
  ``/health`` is polled: the prompt's answer (status, seconds) and the slowest ``/health``.
- ``disconnects``: 450 clients that go away at random moments; ERROR lines and tracebacks in the
  model server's log.
- ``sigkill``: ``--spawn "sh -c 'SERVER & ...; wait'"`` (the shell stays the direct child), then
  SIGKILL of the proxy: seconds until the server is gone (None: still alive after 15 s), 3 runs.
- ``fd``: the proxy under ``RLIMIT_NOFILE`` 96 (soft = hard) with 120 concurrent streams from the
  fake backend: statuses, ``edge_proxy_process_errors_total{type="fd_exhausted"}`` and
  ``edge_proxy_upstream_errors_total{type="connect"}``.

Usage: ``python benchmarks/reliability_procs.py [--baseline DIR] [--only NAME,...] [--out FILE]`` (DIR: e.g. ``git
archive <commit> | tar -x -C DIR``). Writes one JSON object; docs/benchmarks.md, Reliability.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp
import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from support import free_port, stop_process, wait_http_ok  # noqa: E402
from tests.proxy_support import metric_value  # noqa: E402

SIZES_MB = (1.0, 3.6, 10.0)


def _env(code: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(code), "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}


def _model_server(code: Path, model: str, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "model_server", "serve", model, "--port", str(port),
                             "--device", "cpu", "--max-batch", "32"], cwd=code, env=_env(code),
                            stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    wait_http_ok(url + "/health", 180, proc)
    return proc, url


def big_prompt(code: Path, model: str) -> list[dict[str, Any]]:
    out = []
    log = Path(tempfile.mkstemp(suffix=".log")[1])
    proc, url = _model_server(code, model, log)
    try:
        for mb in SIZES_MB:
            text = "ab cd " * int(mb * 1e6 / 6)
            res: dict[str, Any] = {}

            def fire() -> None:
                t0 = time.monotonic()
                r = requests.post(url + "/v1/completions", json={"prompt": text, "max_tokens": 2}, timeout=300)
                res.update(status=r.status_code, seconds=round(time.monotonic() - t0, 3))

            th = threading.Thread(target=fire)
            th.start()
            worst = 0.0
            while th.is_alive():
                t0 = time.monotonic()
                requests.get(url + "/health", timeout=300)
                worst = max(worst, time.monotonic() - t0)
                time.sleep(0.05)
            th.join()
            out.append({"prompt_mb": mb, **res, "health_max_seconds": round(worst, 3)})
    finally:
        stop_process(proc, 30)
        log.unlink()
    return out


async def _drop(url: str, n: int, seed: int) -> None:
    rng = random.Random(seed)
    bodies = [("/generate_stream", {"inputs": "x", "parameters": {"max_new_tokens": 200, "ignore_eos": True}}),
              ("/generate", {"inputs": "x", "parameters": {"max_new_tokens": 200, "ignore_eos": True}}),
              ("/v1/completions", {"prompt": "x", "max_tokens": 200, "ignore_eos": True, "stream": True}),
              ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 200,
                                        "ignore_eos": True, "stream": True})]

    async def one(s: aiohttp.ClientSession, i: int) -> None:
        path, body = bodies[i % 4]
        try:
            resp = await asyncio.wait_for(s.post(url + path, json=body), timeout=rng.uniform(0.02, 1.5))
            await asyncio.wait_for(resp.content.read(rng.randint(1, 3000)), timeout=rng.uniform(0.01, 0.5))
            resp.close()
        except (asyncio.TimeoutError, aiohttp.ClientError):
            pass

    async with aiohttp.ClientSession() as s:
        await asyncio.gather(*[one(s, i) for i in range(n)])


def disconnects(code: Path, model: str) -> dict[str, Any]:
    log = Path(tempfile.mkstemp(suffix=".log")[1])
    proc, url = _model_server(code, model, log)
    try:
        for seed in range(3):
            asyncio.run(_drop(url, 150, seed))
        time.sleep(1)
    finally:
        stop_process(proc, 30)
    text = log.read_text(errors="replace")
    log.unlink()
    return {"clients": 450, "error_lines": sum(" ERROR " in ln for ln in text.splitlines()),
            "tracebacks": text.count("Traceback")}


async def _streams(url: str, n: int) -> list[int]:
    body = {"model": "fake-model", "messages": [{"role": "user", "content": "a b"}], "max_tokens": 4, "stream": True}

    async def one(s: aiohttp.ClientSession) -> int:
        try:
            async with s.post(url + "/v1/chat/completions", json=body, headers={"x-fake-fault": "slow-tokens"}) as r:
                await r.read()
                return r.status
        except aiohttp.ClientError:
            return 0

    conn = aiohttp.TCPConnector(limit=0, force_close=True)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=120)) as s:
        return list(await asyncio.gather(*[one(s) for _ in range(n)]))


def fd(code: Path, limit: int = 96, streams: int = 120) -> dict[str, Any]:
    up_port, port, mport = free_port(), free_port(), free_port()
    up = subprocess.Popen([sys.executable, "-m", "tests.proxy_support", "--port", str(up_port)], cwd=ROOT,
                          env=_env(ROOT), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = Path(tempfile.mkstemp(suffix=".log")[1])

    def pre() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    proxy = subprocess.Popen([sys.executable, "-m", "edge_proxy", "serve", "--backend", f"http://127.0.0.1:{up_port}",
                              "--backend-kind", "openai", "--port", str(port), "--metrics-port", str(mport),
                              "--energy-source", "none", "--access-log", "none"], cwd=code, env=_env(code),
                             stdout=log.open("w"), stderr=subprocess.STDOUT, preexec_fn=pre)
    try:
        wait_http_ok(f"http://127.0.0.1:{up_port}/health", 60, up)
        wait_http_ok(f"http://127.0.0.1:{mport}/metrics", 60, proxy)
        statuses = asyncio.run(_streams(f"http://127.0.0.1:{port}", streams))
        time.sleep(1.5)
        text = requests.get(f"http://127.0.0.1:{mport}/metrics", timeout=10).text
    finally:
        stop_process(proxy, 30)
        stop_process(up, 30)
    logtext = log.read_text(errors="replace")
    log.unlink()
    return {"rlimit_nofile": limit, "streams": streams,
            "statuses": {str(s): statuses.count(s) for s in sorted(set(statuses), key=str)},
            "fd_exhausted_total": metric_value(text, "edge_proxy_process_errors_total", type="fd_exhausted"),
            "upstream_connect_errors_total": metric_value(text, "edge_proxy_upstream_errors_total", type="connect"),
            "log_lines_naming_fds": sum("file descriptors" in ln for ln in logtext.splitlines())}


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def sigkill(code: Path, runs: int = 3) -> list[float | None]:
    out: list[float | None] = []
    for _ in range(runs):
        port, pport = free_port(), free_port()
        pidfile = Path(tempfile.mkdtemp()) / "backend.pid"
        server = f"{sys.executable} -m tests.proxy_support --port {{port}}"
        proxy = subprocess.Popen([sys.executable, "-m", "edge_proxy", "serve", "--backend", f"http://127.0.0.1:{port}",
                                  "--backend-kind", "openai", "--port", str(pport), "--metrics-port", "none",
                                  "--energy-source", "none", "--access-log", "none",
                                  "--spawn", f"sh -c '{server} & echo $! > {pidfile}; wait'"],
                                 cwd=code, env={**_env(code), "PYTHONPATH": f"{code}:{ROOT}"},
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_http_ok(f"http://127.0.0.1:{pport}/healthz", 60, proxy)
            requests.post(f"http://127.0.0.1:{pport}/v1/completions", timeout=60,
                          json={"model": "fake-model", "prompt": "hi", "max_tokens": 2}).raise_for_status()
            backend = int(pidfile.read_text())
            t0 = time.monotonic()
            os.kill(proxy.pid, 9)
            proxy.wait()
            while _alive(backend) and time.monotonic() - t0 < 15:
                time.sleep(0.005)
            gone = not _alive(backend)
            out.append(round(time.monotonic() - t0, 3) if gone else None)
            if not gone:
                os.kill(backend, 9)
        finally:
            if proxy.poll() is None:
                proxy.kill()
    return out


SCENARIOS = ("big_prompt", "disconnects", "sigkill", "fd")


def run_all(code: Path, model: str, only: tuple[str, ...] = SCENARIOS) -> dict[str, Any]:
    res: dict[str, Any] = {"code": str(code)}
    for name in only:
        fn = globals()[name]
        res[name] = fn(code, model) if name in ("big_prompt", "disconnects") else fn(code)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--baseline", type=Path, help="another checkout to run the same scenarios against")
    ap.add_argument("--only", default=",".join(SCENARIOS), help=f"comma-separated scenarios ({', '.join(SCENARIOS)})")
    ap.add_argument("--out", type=Path, help="write the JSON here too")
    args = ap.parse_args()
    only = tuple(x.strip() for x in args.only.split(",") if x.strip())
    if not only or any(x not in SCENARIOS for x in only):
        ap.error(f"--only takes names from {', '.join(SCENARIOS)}")
    with tempfile.TemporaryDirectory() as tmp:
        model = str(Path(tmp) / "tiny")
        subprocess.run([sys.executable, "-m", "model_server", "synth", model, "--preset", "tiny", "--seed", "0",
                        "--quiet"], check=True, cwd=ROOT, env=_env(ROOT), capture_output=True)
        result: dict[str, Any] = {"machine": f"{platform.node()} ({os.cpu_count()} CPUs)",
                                  "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                  "this": run_all(ROOT, model, only)}
        if args.baseline is not None:
            result["baseline"] = run_all(args.baseline.resolve(), model, only)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
