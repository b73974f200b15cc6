"""Running one bench variant for real: model-server spawned behind edge-proxy, load, eval, record.

Per variant: ``edge-proxy serve --spawn "model-server serve ..."`` (the proxy's cold-start path
measures load time and energy on the first request), the fixed batch (all requests at once, per
pass), the optional concurrency sweep, ``edge-eval eval`` through the same proxy, then one
summary record (the measurements-table columns of docs/metrics.md). Every request's joules come
from the proxy's energy ledger (``GET /edge/requests/{id}``), the same numbers the live proxy
exports. Raw per-request rows go to ``requests.jsonl`` as they finish.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import aiohttp

from edge_eval.bench_grid import Grid, Variant
from edge_eval.client import EndpointDown, ProxyClient
from edge_eval.stats import ci95, mean
from edge_eval.tasks import get_task, load_items


class VariantFailed(Exception):
    """One variant could not be measured (recorded with its error; the grid goes on)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get_json(url: str, timeout: float = 10.0, token: str | None = None) -> Any:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read().decode())


def _wait_ok(url: str, proc: subprocess.Popen[bytes], timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise VariantFailed(f"edge-proxy exited with {proc.returncode}: {_tail(log)}")
        with contextlib.suppress(OSError, ValueError):
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        time.sleep(0.2)
    raise VariantFailed(f"edge-proxy not ready after {timeout:.0f} s")


def _tail(log: Path) -> str:
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    return lines[-1][:300] if lines else "(no output)"


@contextlib.contextmanager
def proxy_with_spawn(grid: Grid, v: Variant, model: str, log: Path, token: str) -> Iterator[dict[str, Any]]:
    """edge-proxy on free ports spawning model-server on the first request; yields the URLs."""
    bport, port, mport = free_port(), free_port(), free_port()
    spawn = " ".join(shlex.quote(a) for a in [
        sys.executable, "-m", "model_server", "serve", model, "--port", "{port}", "--device",
        grid.device, "--quantization", v.quantization, "--model-name", v.name,
        "--max-batch", str(max(32, grid.batch_requests)),    # the whole batch at once, as vLLM
        "--log-level", "warning"]).replace("'{port}'", "{port}")
    cmd = [sys.executable, "-m", "edge_proxy", "serve", "--backend", f"http://127.0.0.1:{bport}",
           "--spawn", spawn, "--port", str(port), "--metrics-port", str(mport),
           "--energy-source", grid.energy_source, "--model-name", v.name]
    env = {**os.environ, "EDGE_PROXY_ENERGY_LOOKUP_TOKEN": token, "PYTHONUNBUFFERED": "1"}
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    try:
        _wait_ok(f"http://127.0.0.1:{mport}/healthz", proc, 60, log)
        yield {"url": f"http://127.0.0.1:{port}", "metrics_url": f"http://127.0.0.1:{mport}",
               "backend_url": f"http://127.0.0.1:{bport}", "proc": proc}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


async def _requests(client: ProxyClient, messages: list[list[dict[str, str]]], concurrency: int,
                    max_tokens: int, seed: int) -> tuple[float, list[dict[str, Any]]]:
    """Send the messages with ``concurrency`` in flight; (wall seconds, one row per request)."""
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int, msgs: list[dict[str, str]]) -> dict[str, Any]:
        async with sem:
            r = await client.chat(msgs, max_tokens=max_tokens, temperature=0.0, seed=seed + i)
        return {"status": r.status, "request_id": r.request_id, "error": r.error,
                "latency_seconds": r.latency_seconds, "input_tokens": r.input_tokens,
                "output_tokens": r.output_tokens}

    t0 = time.monotonic()
    rows = await asyncio.gather(*(one(i, m) for i, m in enumerate(messages)))
    seconds = time.monotonic() - t0
    for row in rows:
        e = await client.energy(row["request_id"])
        row["joules"], row["joules_source"] = e.joules, e.source
    return seconds, list(rows)


async def _cold_start(metrics_url: str, timeout: float = 30.0) -> dict[str, Any]:
    """The finished cold start of the first request (``GET /edge/cold-starts``): the proxy lists
    it once its energy is final (a sampling tick after the backend became ready)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        starts = _get_json(metrics_url + "/edge/cold-starts").get("cold_starts") or []
        if starts:
            cold = dict(starts[-1])
            if cold.get("outcome") != "ready":
                raise VariantFailed(f"cold start {cold.get('outcome')}: {cold.get('error')}")
            return cold
        await asyncio.sleep(0.2)
    raise VariantFailed(f"the proxy recorded no finished cold start within {timeout:.0f} s")


def _totals(rows: list[dict[str, Any]], seconds: float) -> dict[str, float]:
    failed = [r for r in rows if r["status"] != 200]
    if failed:
        raise VariantFailed(f"{len(failed)} of {len(rows)} requests failed: {failed[0]['error']}")
    joules = [r["joules"] for r in rows]
    if any(j is None for j in joules):
        raise VariantFailed("the proxy gave no energy for some requests (lookup token? source none?)")
    out_tok = sum(int(r["output_tokens"] or 0) for r in rows)
    energy = float(sum(joules))
    return {"requests": len(rows), "seconds": seconds, "output_tokens": out_tok,
            "input_tokens": sum(int(r["input_tokens"] or 0) for r in rows),
            "energy_joules": energy,
            "joules_per_output_token": energy / out_tok if out_tok else float("nan"),
            "tokens_per_second": out_tok / seconds}


def _eval(grid: Grid, v: Variant, urls: dict[str, Any], token: str, out: Path) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "edge_eval", "eval", "--endpoint", urls["url"], "--task", v.task,
           "--data", v.data, "--limit", str(v.eval_limit), "--passes", str(grid.passes),
           "--out", str(out), "--model", v.name, "--lookup-url", urls["metrics_url"],
           "--lookup-token", token, "--seed", str(grid.seed), "--quiet",
           "--concurrency", str(grid.eval_concurrency)]
    if v.reference:
        cmd += ["--reference-model", v.reference]
    if grid.eval_max_tokens:
        cmd += ["--max-tokens", str(grid.eval_max_tokens)]
    if out.exists():        # an earlier, failed attempt (other ports): start the eval afresh
        shutil.rmtree(out)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise VariantFailed(f"edge-eval eval exited {proc.returncode}: {last[:300]}")
    return json.loads((out / "results.json").read_text())["summary"]


def run_variant(grid: Grid, v: Variant, model: str, adaptation_joules: float, root: Path,
                reference_score: float | None, raw: Any) -> dict[str, Any]:
    """Measure one variant; returns its ``measurements`` and ``sweep`` (raises VariantFailed)."""
    token = secrets.token_hex(16)
    task = get_task(v.task)
    items = load_items(v.data, task, grid.batch_requests, seed=grid.seed, default_split="test")
    prompts = [task.messages(items[i % len(items)]) for i in range(grid.batch_requests)]
    with proxy_with_spawn(grid, v, model, root / "logs" / f"{v.name}.log", token) as urls:

        async def load() -> tuple[dict[str, Any], list[dict[str, float]], list[dict[str, float]]]:
            async with ProxyClient(urls["url"], v.name, lookup_url=urls["metrics_url"],
                                   lookup_token=token, retries=2, timeout_seconds=900) as client:
                _, warm = await _requests(client, prompts[:1], 1, grid.max_tokens, grid.seed)
                if warm[0]["status"] != 200:
                    raise VariantFailed(f"first request (cold start) failed: {warm[0]['error']}")
                cold = await _cold_start(urls["metrics_url"])
                passes = []
                for p in range(grid.passes):
                    secs, rows = await _requests(client, prompts, len(prompts), grid.max_tokens,
                                                 grid.seed)
                    for r in rows:
                        raw.write(json.dumps({"variant": v.name, "phase": "batch", "pass": p,
                                              "concurrency": len(prompts), **r}) + "\n")
                    raw.flush()
                    passes.append(_totals(rows, secs))
                sweep = []
                for c in grid.concurrency:
                    n = max(grid.sweep_requests, c)
                    secs, rows = await _requests(client, [prompts[i % len(prompts)] for i in range(n)],
                                                 c, grid.max_tokens, grid.seed)
                    for r in rows:
                        raw.write(json.dumps({"variant": v.name, "phase": "sweep", "pass": 0,
                                              "concurrency": c, **r}) + "\n")
                    raw.flush()
                    sweep.append({"concurrency": c, **_totals(rows, secs)})
                return cold, passes, sweep

        try:
            cold, passes, sweep = asyncio.run(load())
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, EndpointDown) as exc:
            raise VariantFailed(f"load: {type(exc).__name__}: {exc}; proxy log: "
                                f"{_tail(root / 'logs' / f'{v.name}.log')}") from None
        info = {}
        with contextlib.suppress(OSError, ValueError):
            info = _get_json(urls["backend_url"] + "/info")
        summary = _eval(grid, v, urls, token, root / "eval" / v.name)
    score = summary.get("mean_score")
    if score is None:
        raise VariantFailed("edge-eval eval scored no item")
    sci = summary.get("score_ci95") or [None, None]
    secs = [p["seconds"] for p in passes]
    e_req = [p["energy_joules"] / p["requests"] for p in passes]
    lo, hi = ci95(e_req)
    meas = {
        "model": v.model or v.synth, "task": v.task, "adaptation": v.adaptation,
        "quantization": v.quantization, "size_label": v.size_label, "precision": v.precision,
        "adaptation_joules": adaptation_joules, "batch_requests": grid.batch_requests,
        "batch_seconds": mean(secs), "batch_energy_joules": mean([p["energy_joules"] for p in passes]),
        "output_tokens": mean([p["output_tokens"] for p in passes]),
        "input_tokens": mean([p["input_tokens"] for p in passes]),
        "load_seconds": cold.get("seconds"), "load_energy_joules": cold.get("energy_joules"),
        "score": score, "score_ci95_low": sci[0], "score_ci95_high": sci[1],
        "reference_score": reference_score, "model_bytes": info.get("weight_bytes"),
        "e_req_ci95_low": None if lo != lo else lo, "e_req_ci95_high": None if hi != hi else hi,
        "passes": grid.passes, "energy_source": cold.get("energy_source"),
    }
    return {"measurements": meas, "sweep": sweep}
