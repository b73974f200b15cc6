"""``edge-proxy demo``: the whole thing on one machine, ending by itself.

1. Synthesizes a model (default: the tiny preset) under ``~/.cache/edge-eval`` (once; cached).
2. Starts the proxy as a subprocess with ``--spawn``: the proxy starts the model server on the
   first request, so the demo's first request is a real, measured cold start (scale from zero).
3. Sends a short mixed load (streaming chat, completions, TGI generate) with a progress bar.
4. Shows a live table of the five metrics, latency percentiles, energy per request and cost vs the
   API, each with where the number comes from (measured, estimated, configured), and the URLs of
   ``/metrics``.
5. Stops everything (also on Ctrl-C): the proxy stops the model server it started.

By default the quality score and the adaptation energy are measured (edge_proxy/demo/measured.py):
the model is LoRA-adapted on builtin:rag once (cached) and evaluated through the proxy. With
``--paper-constants`` (implied by ``--quick``) they are configured values instead: the paper's
Llama-3.2-1B rag scores, INT4 0.752 and FP16 0.742, and its LoRA rag fine-tune energy, 92,122 J.

Orchestration only (this module): parse flags, write the proxy's config, run the proxy, hand over to
:mod:`.live`, clean up. Model and processes: :mod:`.processes`; load: :mod:`.load`; output table:
:mod:`.table`; configured paper inputs: :mod:`.paper`.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from edge_proxy.config import ConfigError
from edge_proxy.demo.live import drive
from edge_proxy.demo.paper import PAPER_ADAPTATION_JOULES, PAPER_SCORE_FP16, PAPER_SCORE_INT4
from edge_proxy.demo.processes import ensure_model, free_port, http_ok, kill_leftover_backend, stop, tail
from edge_proxy.demo.table import write_results


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "demo", help="run model server + proxy + load on this machine and show the five metrics live",
        description="Synthesize a model (cached), start the proxy which starts the model server on "
                    "the first request (a measured cold start), send a short mixed load, and show the "
                    "five EDGE-EVAL metrics, latency percentiles and energy per request live, each "
                    "with its source. By default the quality score and adaptation energy are measured "
                    "(LoRA-adapt on builtin:rag once, cached; edge-eval eval through the proxy); "
                    "--paper-constants uses the paper's. Ends by itself and cleans up its processes.")
    p.add_argument("--quick", action="store_true",
                   help="short run (about 10 s of load) for tests and CI; implies --paper-constants "
                        "(no adaptation or evaluation)")
    p.add_argument("--paper-constants", action="store_true",
                   help="use the paper's Llama-3.2-1B scores and LoRA energy as configured inputs instead "
                        "of measuring them (default: LoRA-adapt the model on builtin:rag once, cached "
                        "under the cache dir, and evaluate it through the proxy; edge_proxy/demo/measured.py)")
    p.add_argument("--duration", type=float, default=None, metavar="SECONDS",
                   help="seconds of load after the cold start (default 40; 8 with --quick)")
    p.add_argument("--concurrency", type=int, default=4, help="concurrent clients (default 4)")
    p.add_argument("--preset", default="tiny", choices=("tiny", "llama-3.2-1b", "qwen2.5-0.5b"),
                   help="model shape to synthesize (default tiny; llama-3.2-1b on a GPU)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="model server device (default auto: cuda if available)")
    p.add_argument("--quantization", default="int4",
                   choices=("none", "fp16", "bf16", "int4", "nf4", "int8"),
                   help="model server quantization (default int4, the paper's INT4 variant; Q_ret is "
                        "measured against the unquantized model; nf4/int8 need a GPU)")
    p.add_argument("--energy-source", default="auto",
                   choices=("auto", "nvml", "estimated", "none"),
                   help="proxy energy source (default auto: nvml on a GPU, else estimated)")
    p.add_argument("--model-dir", default=None,
                   help="use this model directory instead of synthesizing one")
    p.add_argument("--cache-dir", default=None,
                   help="where synthesized models and the demo's adapted model are cached (default ~/.cache/edge-eval)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="also write the final numbers to DIR/demo.json and DIR/demo.md")
    p.add_argument("--keep", action="store_true",
                   help="keep the work directory (proxy config, proxy and access logs) under the "
                        "system temp dir; by default it is removed at the end (kept if the demo fails)")
    p.set_defaults(func=run)
    return p



def run(args: argparse.Namespace) -> int:
    from rich.console import Console

    duration = args.duration if args.duration is not None else (8.0 if args.quick else 40.0)
    if duration <= 0 or args.concurrency < 1:
        raise ConfigError("--duration must be > 0 and --concurrency >= 1")
    console = Console()
    if not console.is_terminal and not os.environ.get("COLUMNS"):
        console = Console(width=120)        # not a terminal: a sane width, not rich's 80
    model_dir = ensure_model(args, console)
    model = args.preset if not args.model_dir else Path(args.model_dir).name
    work = Path(tempfile.mkdtemp(prefix="edge-eval-demo-"))
    measured = None
    if not (args.paper_constants or args.quick):
        from edge_proxy.demo.measured import prepare
        try:
            measured = prepare(args, model_dir, work, console, model + "-rag-lora")
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        model_dir, model = measured.model_dir, model + "-rag-lora"
    lookup_token = secrets.token_hex(16)
    backend_port, proxy_port, metrics_port = free_port(), free_port(), free_port()
    spawn = (f"{sys.executable} -m model_server serve {model_dir} --host 127.0.0.1 --port {{port}} "
             f"--device {args.device} --model-name {model}")
    if args.quantization != "none":
        spawn += f" --quantization {args.quantization}"
    cfg = {
        "proxy": {"backend_url": f"http://127.0.0.1:{backend_port}", "port": proxy_port,
                  "metrics_port": metrics_port, "model_name": model,
                  "access_log": str(work / "access.log")},
        "energy": {"source": args.energy_source, "lookup_token": lookup_token},
        "economics": measured.economics() if measured is not None else
                     {"scores": {model: PAPER_SCORE_INT4}, "reference_scores": {model: PAPER_SCORE_FP16},
                      "adaptation_joules": PAPER_ADAPTATION_JOULES},
        "coldstart": {"spawn": spawn, "max_wait_seconds": 600},
    }
    (work / "proxy.yaml").write_text(yaml.safe_dump(cfg))
    log_path = work / "proxy.log"
    log = open(log_path, "wb")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    proxy = subprocess.Popen([sys.executable, "-m", "edge_proxy", "serve", "--config",
                              str(work / "proxy.yaml")], stdout=log, stderr=subprocess.STDOUT,
                             env=env, start_new_session=True)
    base = f"http://127.0.0.1:{proxy_port}"
    metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    rc = 0
    failed = False

    def _on_sigterm(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, _on_sigterm)     # clean up on SIGTERM like Ctrl-C
    try:
        deadline = time.monotonic() + 60
        with console.status("starting the proxy ..."):
            while not http_ok(metrics_url):
                if proxy.poll() is not None or time.monotonic() > deadline:
                    raise ConfigError("the proxy did not start: " +
                                      (tail(log_path).strip().splitlines() or ["no output"])[-1])
                time.sleep(0.2)
        console.print(f"proxy:        {base}  (OpenAI and TGI APIs)")
        console.print(f"proxy /metrics: {metrics_url}")
        console.print(f"model server: http://127.0.0.1:{backend_port}  (/metrics, /info; started by "
                      "the proxy on the first request)")
        console.print(f"logs:         {work}" + ("" if args.keep else "  (removed at the end; --keep keeps it)"))
        max_tokens = 16 if args.preset == "tiny" else 64
        evaluate = None
        if measured is not None:
            import functools

            from edge_proxy.demo.measured import run_eval
            evaluate = functools.partial(run_eval, measured, base, f"http://127.0.0.1:{metrics_port}",
                                         lookup_token, model, console)
        stats, metrics, elapsed = asyncio.run(drive(base, metrics_url, model, duration,
                                                    args.concurrency, max_tokens, console,
                                                    measured, evaluate))
        if args.out:
            write_results(Path(args.out), args, model, stats, metrics, elapsed, console, measured)
        if stats.errors:
            console.print(f"[yellow]{stats.errors} requests failed[/yellow]")
        console.print(f"Prometheus: scrape {metrics_url} and load grafana/rules/edge-eval.rules.yml; "
                      "dashboard: grafana/dashboards/edge-eval.json")
    except KeyboardInterrupt:
        console.print("interrupted: stopping the proxy and the model server")
        rc = 130
    except BaseException:
        failed = True
        raise
    finally:
        with console.status("stopping the proxy and the model server ..."):
            stop(proxy)
            kill_leftover_backend(backend_port)
            log.close()
        signal.signal(signal.SIGTERM, previous)
        if args.keep or failed:
            console.print(f"logs kept: {work}" + ("" if args.keep else " (the demo failed)"))
        else:
            shutil.rmtree(work, ignore_errors=True)
    return rc
