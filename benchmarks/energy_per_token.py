"""Energy per output token by concurrency and quantization: the proxy's ledger next to the counter.

Per quantization, a ``model-server serve`` (fast engine) behind one ``edge-proxy serve`` process
with the chosen energy source; per concurrency C, ``--reps`` cells of closed-loop streaming chat
clients, C at a time, for ``--seconds`` each (64-word prompts, ``--max-tokens`` new tokens, EOS
ignored), after the engine is warm (``/info`` ``engine_warm``) and ``--warm-seconds`` of unmeasured
load at that concurrency (the engine captures CUDA graphs at the first step of each batch size).
Every cell is a window: the proxy's counters are read at rest before the load and again after it
stopped and the ledger had split its last tick, so nothing is in flight at either edge:
- ledger: Σ full / output tokens (``edge_proxy_attributed_full_energy_joules_total``: what the
  requests were charged, active + their share of idle), and Σ active / output tokens;
- counter: the measured counter's delta over the same window / output tokens: the proxy's own
  ``edge_proxy_gpu_energy_joules_total``, and the same counter read directly by this script
  (``direct``: NVML, or with ``estimated`` the model server's CPU time x 65 W, the proxy's
  default); it includes the window's idle edges (about ``--settle`` s at idle
  power each side), which the ledger books as idle, not to requests;
- conservation: (Σ active + idle + foreign) / measured - 1, from the same counters.

    python benchmarks/energy_per_token.py --model-dir /tmp/m1b --device cuda --energy-source nvml \\
        --quantizations bf16,nf4,int4 --concurrency 1,8,64,256 --seconds 10 --reps 3 --out OUT_DIR

``--api-workers N`` (N > 0): the model server serves HTTP from N worker processes in front of its one engine
process (``model-server serve --api-workers N``; with the default 0, HTTP and engine share one process, which limits
tokens/s at 64 and more streams: docs/benchmarks.md, "API worker processes").

``--proxies N`` (N > 1): N proxy processes on one port (``--reuse-port``) sharing the counter
(``--energy-shared``); every counter above is then the sum over the N, so the window checks that
their shares add up to the counter (with NVML: to the card's counter read directly).

Writes ``energy_per_token.json`` (every cell) and ``energy_per_token.md`` (medians over reps) under
``--out``. CPU smoke test: ``--preset tiny --device cpu --energy-source estimated --quantizations none
--concurrency 1,2 --seconds 1 --reps 1`` (tests/test_energy_per_token.py).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from energy_validation_clients import openai_stream  # noqa: E402
from support import (command_line, default_commit, free_port, machine, stop_all, utc_date,  # noqa: E402
                     wait_engine_warm, wait_http_ok)

FAMILIES = {"measured": "edge_proxy_gpu_energy_joules", "full": "edge_proxy_attributed_full_energy_joules",
            "active": "edge_proxy_attributed_energy_joules", "idle": "edge_proxy_idle_energy_joules",
            "foreign": "edge_proxy_foreign_energy_joules", "unapportioned": "edge_proxy_energy_unapportioned_joules",
            "in_flight": "edge_proxy_in_flight_requests"}
SCRIPT = "benchmarks/energy_per_token.py"
PROMPT = " ".join(f"w{i % 10}" for i in range(64))


def scrape(url: str) -> dict[str, float]:
    """The families above (summed over labels) and output tokens, from one /metrics scrape."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=10) as r:
        text = r.read().decode()
    names = {v: k for k, v in FAMILIES.items()}
    out = {k: 0.0 for k in [*FAMILIES, "output_tokens"]}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if fam.name in names and not s.name.endswith("_created"):
                out[names[fam.name]] += s.value
            elif fam.name == "edge_proxy_tokens" and s.name.endswith("_total") and s.labels.get("type") == "output":
                out["output_tokens"] += s.value
    return out


def direct_reader(source: str) -> Any:
    """The proxy's own NVML reader (every GPU, no power reads) for direct counter reads, or None
    when the source is not NVML or NVML is not there."""
    if source != "nvml":
        return None
    try:
        from edge_proxy.energy.nvml_source import NvmlReader
        return NvmlReader(None, read_power=False)
    except Exception as exc:   # noqa: BLE001 - no NVML: the proxy's own counter is the only one
        print(f"energy_per_token: no direct NVML reads ({exc})", file=sys.stderr)
        return None


def direct_joules(reader: Any) -> float | None:
    """Sum of the GPUs' cumulative energy counters in J (None without a reader or on a failed read)."""
    if reader is None:
        return None
    (rd,) = reader.read()
    return None if rd.error else sum(rd.energy_mj.values()) / 1000.0


def settle(metrics: list[str], timeout: float) -> dict[str, float]:
    """Wait until nothing is in flight and no tick waits to be split at any proxy; then the
    counters, summed over the proxies."""
    deadline = time.monotonic() + timeout
    while True:
        scrapes = [scrape(m) for m in metrics]
        c = {k: sum(s[k] for s in scrapes) for k in scrapes[0]}
        if (c["in_flight"] == 0 and c["unapportioned"] == 0) or time.monotonic() > deadline:
            return c
        time.sleep(0.1)


async def load(base: str, model: str, conc: int, seconds: float, max_tokens: int) -> tuple[int, int]:
    """Closed loop: ``conc`` clients for ``seconds``; (completed streams, non-200 answers)."""
    done, bad = 0, 0
    stop = time.monotonic() + seconds
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600),
                                     connector=aiohttp.TCPConnector(limit=0)) as s:
        async def client(k: int) -> None:
            nonlocal done, bad
            n = 0
            while time.monotonic() < stop:
                r = await openai_stream(s, base, model, PROMPT, max_tokens, f"ept-{conc}-{k}-{n}")
                n += 1
                done, bad = done + 1, bad + (r.status != 200)
        await asyncio.gather(*(client(k) for k in range(conc)))
    return done, bad


def cell(urls: dict[str, Any], model: str, quant: str, conc: int, rep: int, args: argparse.Namespace) -> dict[str, Any]:
    time.sleep(args.settle)
    c0, d0 = settle(urls["metrics"], 30), direct_joules(args.direct)
    t0 = time.monotonic()
    streams, bad = asyncio.run(load(urls["proxy"], model, conc, args.seconds, args.max_tokens))
    load_s = time.monotonic() - t0
    time.sleep(args.settle)
    c1, d1 = settle(urls["metrics"], 30), direct_joules(args.direct)
    d = {k: c1[k] - c0[k] for k in ("measured", "full", "active", "idle", "foreign", "output_tokens")}
    tok = d["output_tokens"] or float("nan")
    row = {"quantization": quant, "concurrency": conc, "rep": rep, "load_seconds": load_s, "streams": streams,
           "errors": bad, "output_tokens": d["output_tokens"], "tokens_per_second": d["output_tokens"] / load_s,
           "ledger_full_j_per_token": d["full"] / tok, "ledger_active_j_per_token": d["active"] / tok,
           "counter_j_per_token": d["measured"] / tok, "deltas_joules": d,
           "conservation_error": (d["active"] + d["idle"] + d["foreign"]) / d["measured"] - 1
           if d["measured"] else None}
    if d0 is not None and d1 is not None:
        row["direct_j_per_token"] = (d1 - d0) / tok
        row["direct_vs_proxy_counter"] = (d1 - d0) / d["measured"] - 1 if d["measured"] else None
    print(f"{quant:>5} c={conc:<4} rep {rep}: {row['tokens_per_second']:8.1f} tok/s, ledger "
          f"{row['ledger_full_j_per_token']:.4g} J/tok, counter {row['counter_j_per_token']:.4g} J/tok", flush=True)
    return row


def run_quant(quant: str, model_dir: str, args: argparse.Namespace, tmp: Path) -> list[dict[str, Any]]:
    procs: list[subprocess.Popen] = []
    try:
        ms_port, px_port, mx_port = free_port(), free_port(), free_port()
        with open(tmp / f"model_server_{quant}.log", "wb") as log:
            ms = subprocess.Popen([sys.executable, "-m", "model_server", "serve", model_dir, "--port", str(ms_port),
                                   "--device", args.device, "--quantization", quant, "--engine", args.engine,
                                   "--max-batch", str(args.max_batch), "--log-level", "warning",
                                   *(["--api-workers", str(args.api_workers)] if args.api_workers else [])],
                                  stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(ms)
        wait_http_ok(f"http://127.0.0.1:{ms_port}/health", timeout=args.start_timeout, proc=ms)
        info = wait_engine_warm(f"http://127.0.0.1:{ms_port}", args.start_timeout)   # fused path, not eager
        if args.energy_source == "estimated":    # the same estimate as the proxies', read here directly
            from edge_proxy.energy.estimated_source import EstimatedReader
            args.direct = EstimatedReader(65.0, scope="backend", backend_url=f"http://127.0.0.1:{ms_port}")
        shared = ["--reuse-port", "--energy-shared", str(tmp / f"shared-{quant}")] if args.proxies > 1 else []
        metrics = []
        for _ in range(args.proxies):
            mx_port = free_port()
            px = subprocess.Popen([sys.executable, "-m", "edge_proxy", "serve", "--backend",
                                   f"http://127.0.0.1:{ms_port}", "--port", str(px_port), "--metrics-port",
                                   str(mx_port), "--access-log", "none", "--energy-source", args.energy_source,
                                   *shared], stderr=subprocess.DEVNULL, start_new_session=True)
            procs.append(px)
            wait_http_ok(f"http://127.0.0.1:{mx_port}/healthz", timeout=60, proc=px)
            metrics.append(f"http://127.0.0.1:{mx_port}/metrics")
        urls = {"proxy": f"http://127.0.0.1:{px_port}", "metrics": metrics}
        with urllib.request.urlopen(urls["proxy"] + "/v1/models", timeout=10) as r:
            model = json.loads(r.read())["data"][0]["id"]
        rows = []
        for c in args.concurrency:
            # unmeasured: the engine captures its CUDA graphs lazily, at the first step of each batch size
            asyncio.run(load(urls["proxy"], model, c, args.warm_seconds, args.max_tokens))
            rows += [cell(urls, model, quant, c, rep, args) for rep in range(args.reps)]
        for row in rows:                        # how the server says it ran (its /info), not what was asked
            row["server_api_workers"] = int(info.get("api_workers", 0) or 0)
        return rows
    finally:
        stop_all(procs)


def last_line(path: Path) -> str:
    """The last non-empty line of the text file at ``path`` ("" when there is none or it cannot be read)."""
    try:
        lines = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return lines[-1].strip() if lines else ""


def markdown(rows: list[dict[str, Any]], header: str) -> str:
    lines = [header, "", "| quantization | concurrency | reps | tokens/s | ledger J/token (full) | ledger J/token "
             "(active) | counter J/token | direct J/token | conservation error |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    keys = sorted({(r["quantization"], r["concurrency"]) for r in rows},
                  key=lambda k: ([r["quantization"] for r in rows].index(k[0]), k[1]))
    for q, c in keys:
        rs = [r for r in rows if (r["quantization"], r["concurrency"]) == (q, c)]

        def med(key: str, fmt: str = ".4g") -> str:
            vals = [r[key] for r in rs if r.get(key) is not None and r[key] == r[key]]
            return format(statistics.median(vals), fmt) if vals else "-"
        lines.append(f"| {q} | {c} | {len(rs)} | {med('tokens_per_second', '.1f')} | {med('ledger_full_j_per_token')} "
                     f"| {med('ledger_active_j_per_token')} | {med('counter_j_per_token')} "
                     f"| {med('direct_j_per_token')} | {med('conservation_error', '.2e')} |")
    return "\n".join(lines) + "\n\nMedians over reps; every cell in energy_per_token.json.\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--model-dir", help="a model directory (e.g. model-server synth ... --preset llama-3.2-1b)")
    src.add_argument("--preset", help="synthesize this model-server preset into a temporary directory")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--engine", default="auto", choices=("auto", "fast", "transformers"))
    ap.add_argument("--energy-source", default="nvml", choices=("nvml", "estimated", "auto"))
    ap.add_argument("--quantizations", default="bf16,nf4,int4", help="comma-separated (model-server --quantization)")
    ap.add_argument("--concurrency", default="1,8,64,256", help="comma-separated stream counts")
    ap.add_argument("--seconds", type=float, default=10.0, help="load seconds per cell (default 10)")
    ap.add_argument("--reps", type=int, default=3, help="cells per (quantization, concurrency) (default 3)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--max-batch", type=int, default=256, help="model-server --max-batch (default 256)")
    ap.add_argument("--warm-seconds", type=float, default=3.0,
                    help="unmeasured load at each concurrency before its cells (lazy graph capture; default 3)")
    ap.add_argument("--settle", type=float, default=1.0, help="idle seconds before and after each cell")
    ap.add_argument("--start-timeout", type=float, default=600.0, help="model-server start-up limit, s")
    ap.add_argument("--proxies", type=int, default=1, help="proxy processes on one port sharing the counter (default 1)")
    ap.add_argument("--api-workers", type=int, default=0,
                    help="model-server --api-workers: HTTP worker processes in front of the engine "
                         "(default 0: one process)")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    try:
        args.concurrency = [int(x) for x in args.concurrency.split(",")]
        if min(args.concurrency) < 1 or args.reps < 1 or args.seconds <= 0 or not 1 <= args.proxies <= 16 \
                or not 0 <= args.api_workers <= 16:
            raise ValueError
    except ValueError:
        ap.error("--concurrency takes positive integers, --reps >= 1, --seconds > 0, --proxies 1..16, "
                 "--api-workers 0..16")
    args.out.mkdir(parents=True, exist_ok=True)
    args.direct = direct_reader(args.energy_source)
    tmp = Path(tempfile.mkdtemp(prefix="edge-ept-"))
    model_dir = args.model_dir
    if args.preset:
        model_dir = str(tmp / "model")
        subprocess.run([sys.executable, "-m", "model_server", "synth", model_dir, "--preset", args.preset,
                        "--seed", "0", "--quiet"], check=True)
    rows: list[dict[str, Any]] = []
    errors: dict[str, str] = {}
    for q in args.quantizations.split(","):
        try:
            rows += run_quant(q, model_dir, args, tmp)
        except Exception as exc:   # noqa: BLE001 - one quantization failing must not lose the others
            why = last_line(tmp / f"model_server_{q}.log")       # the server's own last word, where it said one
            errors[q] = f"{type(exc).__name__}: {exc}"[:300] + (f" (model server: {why[:200]})" if why else "")
            print(f"energy_per_token: {q} failed: {errors[q]}", file=sys.stderr)
        text = write(args, rows, errors)          # after each quantization: a cut-off run keeps the rest
    if args.direct is not None:
        args.direct.close()
    print(text)
    return 0 if rows and not errors else 1


def write(args: argparse.Namespace, rows: list[dict[str, Any]], errors: dict[str, str]) -> str:
    header = (f"# Energy per output token ({args.energy_source}, {args.device}"
              f"{f', {args.proxies} proxies sharing the counter' if args.proxies > 1 else ''}"
              f"{f', {args.api_workers} API worker processes' if args.api_workers else ''})\n\n- date: {utc_date()}\n"
              f"- machine: {machine()}\n- commit: {default_commit()}\n- command: `{command_line(SCRIPT)}`"
              + "".join(f"\n- {q} failed: {e}" for q, e in errors.items()))
    (args.out / "energy_per_token.json").write_text(json.dumps(
        {"command": command_line(SCRIPT), "date": utc_date(), "machine": machine(), "commit": default_commit(),
         "proxies": args.proxies, "api_workers": args.api_workers, "errors": errors, "cells": rows}, indent=1))
    text = markdown(rows, header)
    (args.out / "energy_per_token.md").write_text(text)
    return text


if __name__ == "__main__":
    sys.exit(main())
