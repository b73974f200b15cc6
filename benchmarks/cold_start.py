#!/usr/bin/env python
"""Cold-start benchmark: real cold starts of the model server under the proxy's supervisor.

For each variant (quantization), the proxy runs with ``--spawn`` (the model server starts on the
first request, as in scale to zero). Each repetition:

1. the backend is stopped (scale to zero), then ``--batch`` requests arrive at once; the first
   spawns the server, all are held and released when it is ready;
2. the cold start's phases come from the proxy (hold -> process -> listening -> model load start /
   end from ``/info`` -> ready -> first token) and its energy from the proxy's energy source
   (NVML on a GPU; ``estimated`` on CPU, labelled so), plus the server's own ``load_energy_joules``;
   then it waits for the engine to be warm (``/info`` ``engine_warm``: ``serve`` compiles in the
   background after the first token) and measures the energy from hold start to then as well;
3. warm: ``--warm-requests`` requests at concurrency ``--batch`` give the mean request energy and
   duration (proxy ledger, full attribution) and the batch's energy and time (for the paper's form);
4. idle: the loaded model sits idle for ``--idle-seconds``; measured energy / time = idle watts.

Reported per variant, side by side:

* production C_tax (energy) = E_cold / mean E_req; C_tax (time) = t_cold / mean t_req;
* paper-form C_tax = N * t_load / t_batch (the paper's E_load / E_req with power cancelled; t_load
  = model load start -> ready as the server reports it, N = --batch concurrent requests);
* keep-warm break-even idle time = E_cold / P_idle; and the same two with E_cold to engine warm (hold
  start -> warm, the background warm-up included);
* the paper's T4 figures for Llama 1B (vLLM, N = 100; EDGE-EVAL, ACL 2026 Industry Track, from the
  authors' published results, Abdullah4152/EDGE-EVAL results/c_tax).

Writes ``cold_start.json`` and ``cold_start.md`` under ``--out``. Runs on CPU with
``--preset tiny`` (tens of seconds); the GPU run uses ``--preset llama-3.2-1b``.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# the spawned `python -m model_server` must import this checkout too, wherever we run from
os.environ["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])

from cold_start_report import PAPER_NOTE, _fmt, markdown, summarise  # noqa: E402
from edge_proxy.config import Settings  # noqa: E402
from edge_proxy.energy.window import EnergyWindows  # noqa: E402
from edge_proxy.proxy.server import build_proxy  # noqa: E402
from model_server_process import synth_into  # noqa: E402
from support import free_port, utc_date, wait_engine_warm  # noqa: E402

def _err(msg: str) -> int:
    print(f"cold_start.py: error: {msg}", file=sys.stderr)
    return 2


async def _request(session: aiohttp.ClientSession, url: str, i: int, max_tokens: int) -> dict[str, Any]:
    """One streaming completion (so the proxy sees the real first token), read to the end."""
    body = {"model": "bench", "prompt": f"Request {i}: summarise the benefits of energy metrics.",
            "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.monotonic()
    async with session.post(url + "/v1/completions", json=body) as r:
        out_tokens = None
        error = None
        if r.status != 200:
            error = (await r.text())[:300]
        else:
            async for line in r.content:
                if not line.startswith(b"data:") or line.strip() == b"data: [DONE]":
                    continue
                try:
                    obj = json.loads(line[5:])
                except ValueError:
                    continue
                if isinstance(obj, dict) and obj.get("error"):
                    error = str(obj["error"])[:300]
                if isinstance(obj, dict) and isinstance(obj.get("usage"), dict):
                    out_tokens = obj["usage"].get("completion_tokens")
        return {"status": r.status if error is None else 599, "seconds": time.monotonic() - t0,
                "cold_start": r.headers.get("x-edge-cold-start") == "true",
                "wait_seconds": float(r.headers.get("x-edge-cold-start-wait-seconds", "nan")),
                "output_tokens": out_tokens, "error": error}


async def run_variant(args: argparse.Namespace, model_dir: Path, quant: str, progress: Any, task: Any) -> dict[str, Any]:
    st = Settings()
    st.proxy.backend_url = f"http://127.0.0.1:{free_port()}"
    st.proxy.port = 0
    st.proxy.metrics_port = None
    st.proxy.access_log = None
    st.proxy.model_name = "bench"
    st.energy.source = args.energy_source
    st.energy.period_seconds = 0.1
    st.coldstart.spawn = (f"{shlex.quote(sys.executable)} -m model_server serve {shlex.quote(str(model_dir))} "
                          f"--port {{port}} --device {args.device} --quantization {quant} --model-name bench "
                          f"--max-batch {max(args.batch, 8)} --log-level warning")
    st.coldstart.max_wait_seconds = args.max_wait
    st.coldstart.max_pending = max(100, args.batch)
    st.coldstart.release_burst = max(16, args.batch)
    st.coldstart.stop_grace_seconds = 20
    rt = build_proxy(st)
    await rt.start()
    gate = rt.gate
    energy = rt.components.get("energy")
    out: dict[str, Any] = {"variant": quant, "energy_source": getattr(energy, "source", "none"),
                           "cold_starts": [], "warm": [], "idle": []}
    timeout = aiohttp.ClientTimeout(total=args.max_wait + 120)
    try:
        async with aiohttp.ClientSession(timeout=timeout) as session:
            for rep in range(args.cold_starts):
                await gate.scale_to_zero()
                n_hist = len(gate.history)
                results = await asyncio.gather(*[_request(session, rt.url, i, args.max_tokens)
                                                 for i in range(args.batch)])
                bad = [r for r in results if r["status"] != 200]
                if bad:
                    raise RuntimeError(f"{quant}: {len(bad)} held request(s) failed: {bad[0]['error']}")
                await rt.drain()
                for _ in range(100):
                    if len(gate.history) > n_hist:
                        break
                    await asyncio.sleep(0.1)
                cs = gate.history[-1]
                # serve warms the fast engine up in the background after the first token (the first
                # requests run eagerly): the cold start is not over for the energy bill until it is warm,
                # and warm requests measured before that would be the eager path's
                info = await asyncio.to_thread(wait_engine_warm, st.proxy.backend_url, args.max_wait)
                warm_at = time.monotonic_ns() if info.get("engine_warm") else None   # None: not reported
                to_warm = None
                if warm_at is not None and energy is not None:
                    to_warm = EnergyWindows(energy).measure(cs.timeline.hold_start, warm_at).joules_if_covered()
                progress.advance(task)

                # warm batch: N requests at concurrency --batch
                sem = asyncio.Semaphore(args.batch)

                async def one(i: int) -> dict[str, Any]:
                    async with sem:
                        return await _request(session, rt.url, 1000 + i, args.max_tokens)

                t0 = time.monotonic_ns()
                warm = await asyncio.gather(*[one(i) for i in range(args.warm_requests)])
                t1 = time.monotonic_ns()
                await rt.drain()
                await asyncio.sleep(0.3)          # let the tick after the batch close
                e_batch = EnergyWindows(energy).measure(t0, t1).joules_if_covered() if energy is not None else None
                out["warm"].append({"requests": len(warm), "ok": sum(r["status"] == 200 for r in warm),
                                    "batch_seconds": (t1 - t0) / 1e9, "batch_joules": e_batch,
                                    "output_tokens": sum(r["output_tokens"] or 0 for r in warm)})
                progress.advance(task)

                # idle with the model loaded
                t0 = time.monotonic_ns()
                await asyncio.sleep(args.idle_seconds)
                t1 = time.monotonic_ns()
                await asyncio.sleep(0.3)
                e_idle = EnergyWindows(energy).measure(t0, t1).joules_if_covered() if energy is not None else None
                out["idle"].append({"seconds": (t1 - t0) / 1e9, "joules": e_idle,
                                    "watts": None if e_idle is None else e_idle / ((t1 - t0) / 1e9)})
                # the snapshot recomputes the last cold start's tax from the warm requests seen so far
                rec = next((c for c in gate.snapshot()["cold_starts"] if c["id"] == cs.id), None) or cs.to_dict()
                rec["client_first_request_seconds"] = max(r["seconds"] for r in results)
                rec["held_requests_with_header"] = sum(r["cold_start"] for r in results)
                rec["model_load_to_ready_seconds"] = _load_to_ready(rec)
                rec["hold_to_engine_warm_seconds"] = (None if warm_at is None
                                                      else (warm_at - cs.timeline.hold_start) / 1e9)
                rec["energy_to_engine_warm_joules"] = to_warm
                out["cold_starts"].append(rec)
                progress.advance(task)
            info = await _get_json(session, st.proxy.backend_url + "/info")
            out["backend_info"] = {k: info.get(k) for k in ("model_id", "quantization", "dtype", "engine",
                                                            "weight_bytes", "parameters", "devices",
                                                            "synthetic")} if info else None
    finally:
        await rt.stop()
    return out


def _load_to_ready(cs: dict[str, Any]) -> float | None:
    b = cs.get("backend_startup_epoch_seconds") or {}
    if b.get("load_start") is not None and b.get("ready") is not None:
        return float(b["ready"]) - float(b["load_start"])
    return None


async def _get_json(session: aiohttp.ClientSession, url: str) -> dict[str, Any] | None:
    try:
        async with session.get(url) as r:
            return await r.json(content_type=None) if r.status == 200 else None
    except aiohttp.ClientError:
        return None


def _device_name(device: str) -> str:
    if device != "cpu":
        try:
            import pynvml  # type: ignore[import-not-found]

            pynvml.nvmlInit()
            name = pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(0))
            return name.decode() if isinstance(name, bytes) else str(name)
        except Exception:  # noqa: BLE001 - no NVML: CPU
            pass
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="Real cold starts of the model server under the proxy's --spawn supervisor: "
                    "phases, energy, C_tax (energy, time, paper form) and keep-warm break-even idle time.")
    ap.add_argument("--preset", default="tiny", choices=("tiny", "llama-3.2-1b", "qwen2.5-0.5b"),
                    help="model shape to synthesise (default tiny: CPU smoke run)")
    ap.add_argument("--model-dir", type=Path, help="reuse this synthesised model directory (default: a temp dir)")
    ap.add_argument("--variants", default="fp16,nf4", help="comma-separated quantizations (default fp16,nf4)")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="model server device")
    ap.add_argument("--cold-starts", type=int, default=2, help="cold starts per variant (default 2)")
    ap.add_argument("--batch", type=int, default=16, help="concurrent requests (held during the cold start; N)")
    ap.add_argument("--warm-requests", type=int, default=64, help="warm requests after each cold start")
    ap.add_argument("--max-tokens", type=int, default=32, help="output tokens per request")
    ap.add_argument("--idle-seconds", type=float, default=5.0, help="idle measurement with the model loaded")
    ap.add_argument("--max-wait", type=float, default=600.0, help="cold-start bound (s)")
    ap.add_argument("--energy-source", default="auto", choices=("auto", "nvml", "estimated", "none"))
    ap.add_argument("--out", type=Path, required=True, help="directory for cold_start.json and cold_start.md")
    args = ap.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    bad = [v for v in variants if v not in ("none", "fp16", "bf16", "nf4", "int8", "int4")]
    if bad or not variants:
        return _err(f"--variants: unknown {', '.join(bad) or '(empty)'}; use none, fp16, bf16, nf4, int8, int4")
    if min(args.cold_starts, args.batch, args.warm_requests, args.max_tokens) < 1 or args.idle_seconds <= 0:
        return _err("--cold-starts, --batch, --warm-requests, --max-tokens must be >= 1; --idle-seconds > 0")
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return _err(f"--out {args.out}: {exc.strerror or exc}")

    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table

    console = Console(stderr=True)
    tmp = None
    model_dir = args.model_dir
    if model_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="cold_start_")
        model_dir = Path(tmp.name) / args.preset
    cfg_path = Path(model_dir) / "config.json"
    if cfg_path.exists():
        # an existing directory: label the results with what it really is, not the --preset default
        try:
            cfg = json.loads(cfg_path.read_text())
        except (OSError, ValueError) as exc:
            return _err(f"{cfg_path}: unreadable config ({exc})")
        args.preset = str(cfg.get("edge_eval_preset") or cfg.get("_name_or_path") or Path(model_dir).name)
        console.print(f"using {args.preset} from {model_dir}")
    else:
        console.print(f"synthesising {args.preset} into {model_dir} ...")
    try:
        synth_into(args.preset, model_dir)
    except subprocess.CalledProcessError as exc:
        return _err(f"model-server synth failed with exit code {exc.returncode}")
    result: dict[str, Any] = {
        "preset": args.preset, "device_name": _device_name(args.device), "batch": args.batch,
        "max_tokens": args.max_tokens, "cold_starts": args.cold_starts,
        "date": utc_date("%Y-%m-%d %H:%M UTC"),
        "command": "python benchmarks/cold_start.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:])),
        "paper_note": PAPER_NOTE, "variants": [],
    }
    try:
        with Progress(console=console) as progress:
            for quant in variants:
                task = progress.add_task(f"{args.preset} {quant}", total=3 * args.cold_starts)
                try:
                    v = asyncio.run(run_variant(args, model_dir, quant, progress, task))
                except RuntimeError as exc:
                    console.print(f"[red]{quant}: {exc}[/red]")
                    v = {"variant": quant, "error": str(exc)}
                result["variants"].append(v)
    finally:
        if tmp is not None:
            tmp.cleanup()
    ok = [v for v in result["variants"] if "error" not in v]
    result["summary"] = [summarise(v, args.batch) for v in ok]
    (args.out / "cold_start.json").write_text(json.dumps(result, indent=2, default=str))
    md = markdown(result)
    (args.out / "cold_start.md").write_text(md)

    table = Table(title=f"cold start, {args.preset}, {result['device_name']}")
    for col in ("variant", "cold s", "cold J", "load J", "req J", "C_tax E", "C_tax t", "C_tax paper form",
                "break-even idle s", "paper T4 1B mean"):
        table.add_column(col)
    for r in result["summary"]:
        table.add_row(r["variant"], _fmt(r["cold_start_seconds"], 2), _fmt(r["cold_start_joules"]),
                      _fmt(r["model_server_load_joules"]), _fmt(r["mean_request_joules"], 3),
                      _fmt(r["c_tax_energy"]), _fmt(r["c_tax_time"]), _fmt(r["c_tax_paper_form"]),
                      _fmt(r["keep_warm_break_even_idle_seconds"]), _fmt(r["paper_t4_llama_1b_c_tax_mean"]))
    Console(width=200).print(table)
    print(f"wrote {args.out / 'cold_start.json'} and {args.out / 'cold_start.md'}")
    return 0 if len(ok) == len(variants) else 1


if __name__ == "__main__":
    sys.exit(main())
