#!/usr/bin/env python
"""Model server throughput: the HTTP server at several concurrencies vs sequential ``model.generate``.

For each quantization (``fp16``, ``nf4``, and ``gptq`` when gptqmodel is importable):

1. ``model-server serve`` (a subprocess, the ``--engine`` asked for) with the synthesized model;
2. closed-loop load through the OpenAI streaming API (``/v1/completions``, prompts of exactly
   ``--prompt-tokens`` token ids, ``--new-tokens`` new tokens each with ``ignore_eos``, usage from
   ``stream_options.include_usage``) at each concurrency level: ``c`` requests in flight, ``2c``
   requests (at least 4) per level. Reported: aggregate output tokens/s (all completion tokens /
   wall time of the level), TTFT p50/p99 (request sent -> first token chunk), J/token from the NVML
   energy counter when there is one;
3. the server is stopped, and the same checkpoint with the same quantization is loaded in this process
   (``model_server.loading.load_model``) for the baseline: plain ``model.generate`` one request at a
   time (batch 1), same prompts, ``min_new_tokens = max_new_tokens``;
4. ratios: server tokens/s over sequential tokens/s at each level, and rho_sys = tokens/s per GB of
   weights as loaded (``/info`` weight_bytes) next to the paper's 6,930 tokens/s/GB (T4, vLLM, 1B INT4).

Writes ``model_server_throughput.json`` and ``model_server_throughput.md`` under ``--out``.
CPU smoke: ``--preset tiny --concurrency 1,4 --new-tokens 8``. GPU: defaults (llama-3.2-1b).
HTTP vs in-process throughput to quote: ``benchmarks/steady_state.py`` (steady-state windows, same run).
"""
from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PAPER_RHO_SYS = 6930.0          # tokens/s/GB, mean of Llama-3.2-1B INT4 on a T4 with vLLM (EDGE-EVAL results/rho_sys.csv)
TARGET_RATIO_AT_32 = 8.0        # issue 2: at concurrency 32, >= 8x sequential generate


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    k = (len(v) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


def _console():
    try:
        from rich.console import Console

        return Console(stderr=True)
    except Exception:
        return None


def log(msg: str) -> None:
    c = _console()
    if c is not None:
        from rich.markup import escape

        c.print(f"[bold cyan]bench[/] {escape(msg)}")
    else:
        print(f"bench: {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- model + prompts
def synth_model(preset: str, out: Path, seed: int) -> Path:
    target = out / f"model-{preset}-seed{seed}"
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        log(f"reusing {target}")
        return target
    log(f"synthesizing {preset} into {target}")
    subprocess.run([sys.executable, "-m", "model_server", "synth", str(target), "--preset", preset,
                    "--seed", str(seed), "--quiet"], check=True)
    return target


def make_prompts(model_dir: Path, n: int, prompt_tokens: int) -> list[list[int]]:
    """``n`` distinct prompts of exactly ``prompt_tokens`` ids, cut from local text."""
    import sysconfig

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    text = "".join(p.read_text(errors="replace") for p in sorted(stdlib.glob("*.py"))[:40])
    ids = tok(text, add_special_tokens=False)["input_ids"]
    special = set(tok.all_special_ids)
    ids = [i for i in ids if i not in special]
    need = n * prompt_tokens
    while len(ids) < need:
        ids = ids + ids
    return [ids[i * prompt_tokens:(i + 1) * prompt_tokens] for i in range(n)]


def maybe_make_gptq(model_dir: Path, out: Path, prompts_text: list[str]) -> tuple[Path | None, str | None]:
    """Quantize with gptqmodel (4 bit, group 128) when it imports; (dir, None) or (None, reason)."""
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, os.cpu_count() or 2)))
    try:
        from gptqmodel import GPTQModel, QuantizeConfig
    except Exception as exc:
        return None, f"gptqmodel not importable ({type(exc).__name__})"
    target = out / (model_dir.name + "-gptq")
    if (target / "config.json").is_file():
        return target, None
    try:
        log("quantizing with gptqmodel (4 bit, group 128)")
        m = GPTQModel.load(str(model_dir), QuantizeConfig(bits=4, group_size=128, desc_act=False))
        m.quantize(prompts_text, batch_size=4)
        m.save(str(target))
        return target, None
    except Exception as exc:  # kernels that don't build, no CUDA, ...
        return None, f"gptq quantization failed: {type(exc).__name__}: {str(exc)[:200]}"


# ----------------------------------------------------------------------------- server
class Server:
    def __init__(self, model_dir: Path, quantization: str, engine: str, device: str, max_batch: int,
                 max_total: int, log_path: Path) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        cmd = [sys.executable, "-m", "model_server", "serve", str(model_dir), "--port", str(self.port),
               "--device", device, "--quantization", quantization, "--engine", engine,
               "--max-batch", str(max_batch), "--max-total-tokens", str(max_total),
               "--max-concurrent-requests", str(max(256, 2 * max_batch))]
        self.cmd = cmd
        self.log_file = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log_file, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def wait_ready(self, timeout: float) -> dict[str, Any]:
        import urllib.error
        import urllib.request

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: "
                                   f"{self.log_path.read_text(errors='replace')[-1500:]}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        with urllib.request.urlopen(self.url + "/info", timeout=5) as i:
                            return json.load(i)
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.25)
        raise RuntimeError(f"server not ready after {timeout:.0f} s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.log_file.close()


async def _one_request(session, url: str, prompt: list[int], new_tokens: int, model: str) -> dict[str, Any]:
    body = {"model": model, "prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.monotonic()
    first = None
    usage = None
    async with session.post(url + "/v1/completions", json=body) as resp:
        if resp.status != 200:
            raise RuntimeError(f"HTTP {resp.status}: {(await resp.text())[:300]}")
        async for raw in resp.content:
            line = raw.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            data = json.loads(line[6:])
            if data.get("choices"):
                if first is None:
                    first = time.monotonic()
            elif data.get("usage"):
                usage = data["usage"]
    t1 = time.monotonic()
    if usage is None:
        raise RuntimeError("no usage chunk in the stream")
    return {"ttft_s": (first or t1) - t0, "duration_s": t1 - t0, "completion_tokens": usage["completion_tokens"]}


async def run_level(url: str, model: str, prompts: list[list[int]], concurrency: int, n_requests: int,
                    new_tokens: int) -> dict[str, Any]:
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=1800)
    results: list[dict[str, Any]] = []
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=concurrency)) as s:
        queue: asyncio.Queue = asyncio.Queue()
        for i in range(n_requests):
            queue.put_nowait(prompts[i % len(prompts)])

        async def worker():
            while True:
                try:
                    p = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                results.append(await _one_request(s, url, p, new_tokens, model))

        t0 = time.monotonic()
        await asyncio.gather(*[worker() for _ in range(concurrency)])
        wall = time.monotonic() - t0
    tokens = sum(r["completion_tokens"] for r in results)
    ttfts = [r["ttft_s"] for r in results]
    return {"concurrency": concurrency, "requests": len(results), "completion_tokens": tokens,
            "wall_s": wall, "tokens_per_s": tokens / wall if wall > 0 else None,
            "ttft_p50_s": _percentile(ttfts, 0.5), "ttft_p99_s": _percentile(ttfts, 0.99)}


def _energy_mj(uuids: list[str]) -> dict[str, int] | None:
    from model_server.gpu import energy_millijoules

    return energy_millijoules(uuids)


def sequential_generate(model_dir: Path, quantization: str, device: str, prompts: list[list[int]],
                        new_tokens: int, n: int) -> dict[str, Any]:
    """Plain ``model.generate`` one prompt at a time, same quantization path as the server."""
    import torch

    from model_server.loading import load_model

    lm = load_model(str(model_dir), device, quantization)
    model = lm.model

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def gen(ids: list[int], max_new: int) -> int:
        x = torch.tensor([ids], device=model.device)
        with torch.no_grad():
            out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_new,
                                 min_new_tokens=max_new, do_sample=False,
                                 pad_token_id=lm.tokenizer.pad_token_id)
        return int(out.shape[1] - x.shape[1])

    gen(prompts[0], 2)                                          # warm-up
    sync()
    ttfts = []
    for p in prompts[:n]:
        t0 = time.monotonic()
        gen(p, 1)
        sync()
        ttfts.append(time.monotonic() - t0)
    tokens = 0
    t0 = time.monotonic()
    for p in prompts[:n]:
        tokens += gen(p, new_tokens)
    sync()
    wall = time.monotonic() - t0
    result = {"requests": n, "completion_tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
              "ttft_p50_s": _percentile(ttfts, 0.5), "weight_bytes": lm.weight_bytes}
    del model, lm
    if device == "cuda":
        torch.cuda.empty_cache()
    return result


# ----------------------------------------------------------------------------- report
COLUMNS = ("quantization", "engine", "weights (GB)", "concurrency", "tokens/s", "x sequential", "TTFT p50 (ms)",
           "TTFT p99 (ms)", "rho_sys (tokens/s/GB)", "paper rho_sys", "J/token")


def table_rows(report: dict[str, Any]) -> list[tuple[str, ...]]:
    """One row per sequential baseline (once per quantization) and per measured level."""
    rows: list[tuple[str, ...]] = []
    baseline_done: set[str] = set()
    for v in report["variants"]:
        q = v["quantization"]
        seq = v.get("sequential")
        gb = v.get("weight_bytes", 0) / 1e9
        if seq and q not in baseline_done and gb > 0:
            baseline_done.add(q)
            rows.append((q, "model.generate", f"{gb:.4g}", "1 (sequential)", f"{seq['tokens_per_s']:.1f}", "1.00",
                         f"{seq['ttft_p50_s'] * 1e3:.1f}", "", f"{seq['tokens_per_s'] / gb:.0f}",
                         f"{PAPER_RHO_SYS:.0f}", ""))
        for lvl in v.get("levels", []):
            jt = f"{lvl['joules_per_token']:.4f}" if lvl.get("joules_per_token") is not None else "n/a"
            rows.append((q, str(v.get("engine")), f"{gb:.4g}", str(lvl["concurrency"]), f"{lvl['tokens_per_s']:.1f}",
                         f"{lvl['ratio_vs_sequential']:.2f}", f"{lvl['ttft_p50_s'] * 1e3:.1f}",
                         f"{lvl['ttft_p99_s'] * 1e3:.1f}", f"{lvl['rho_sys']:.0f}", f"{PAPER_RHO_SYS:.0f}", jt))
        if v.get("skipped"):
            rows.append((q, str(v.get("engine")), "skipped", v["skipped"].replace("|", "/"), "", "", "", "", "", "", ""))
    return rows


def render_markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    lines = [
        "# Model server throughput",
        "",
        f"- date: {report['date']}",
        f"- device: {env['device_name']} ({env['device']}); torch {env['torch']}, transformers {env['transformers']}",
        f"- command: `{report['command']}`",
        f"- model: {report['preset']} (synthetic weights), prompts {report['prompt_tokens']} tokens, "
        f"{report['new_tokens']} new tokens, greedy, ignore_eos; OpenAI streaming API, closed loop",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    lines += ["| " + " | ".join(r) + " |" for r in table_rows(report)]
    lines += ["", f"Target (issue 2): at concurrency 32, at least {TARGET_RATIO_AT_32:.0f}x sequential generate.",
              "rho_sys = output tokens/s / weight GB as loaded (measured from the tensors, `/info` weight_bytes); "
              "the paper's 6,930 tokens/s/GB is Llama-3.2-1B INT4 on a T4 with vLLM (nominal size). "
              "J/token: NVML energy counter over the whole level (idle draw included).", ""]
    for v in report["variants"]:
        if v.get("target_at_32") is not None:
            lines.append(f"- {v['quantization']} / {v.get('engine')}: at concurrency 32, {v['target_at_32']:.2f}x "
                         f"sequential ({'meets' if v['target_at_32'] >= TARGET_RATIO_AT_32 else 'below'} the 8x target)")
    return "\n".join(lines) + "\n"


def print_table(report: dict[str, Any]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except Exception:
        print(render_markdown(report))
        return
    t = Table(title=f"model server throughput ({report['environment']['device_name']})")
    for col in COLUMNS:
        t.add_column(col, justify="right")
    for row in table_rows(report):
        t.add_row(*row)
    Console(width=180).print(t)


# ----------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="llama-3.2-1b", choices=("tiny", "llama-3.2-1b", "qwen2.5-0.5b"))
    p.add_argument("--model-dir", default=None, help="serve this model directory instead of synthesizing")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--engine", default="auto",
                   help="comma list of auto,fast,transformers: each is served and measured in this run "
                        "(e.g. transformers,fast for both side by side; default: auto)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--quantizations", default="fp16,nf4,gptq",
                   help="comma list of fp16,bf16,nf4,int8,gptq,none (gptq: only when gptqmodel imports)")
    p.add_argument("--concurrency", default="1,8,32,64", help="comma list of concurrency levels")
    p.add_argument("--requests-factor", type=float, default=2.0, help="requests per level = factor x concurrency (min 4)")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--sequential-requests", type=int, default=4, help="requests in the sequential baseline")
    p.add_argument("--ready-timeout", type=float, default=600.0)
    p.add_argument("--out", required=True, help="directory for JSON + markdown results")
    p.add_argument("--work-dir", default=None,
                   help="where synthesized models go (kept; default: a temp dir removed at the end)")
    args = p.parse_args(argv)
    try:
        args.levels = sorted({int(x) for x in args.concurrency.split(",") if x.strip()})
        if not args.levels or min(args.levels) < 1:
            raise ValueError
    except ValueError:
        p.error(f"--concurrency must be a comma list of positive integers, got {args.concurrency!r}")
    args.engines = [e.strip() for e in args.engine.split(",") if e.strip()]
    if not args.engines or any(e not in ("auto", "fast", "transformers") for e in args.engines):
        p.error(f"--engine must be a comma list of auto, fast, transformers; got {args.engine!r}")
    args.quants = [q.strip() for q in args.quantizations.split(",") if q.strip()]
    bad = [q for q in args.quants if q not in ("fp16", "bf16", "nf4", "int8", "gptq", "none")]
    if bad:
        p.error(f"unknown quantization(s): {', '.join(bad)}")
    if args.prompt_tokens < 1 or args.new_tokens < 1:
        p.error("--prompt-tokens and --new-tokens must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch
    import transformers

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    device_name = torch.cuda.get_device_name(0) if device == "cuda" else (platform.processor() or platform.machine())
    # synthesized / quantized models never go under --out (that directory is fetched back)
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="ms_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        return _run(args, out, work, device, device_name, torch, transformers)
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)


def _run(args, out: Path, work: Path, device: str, device_name: str, torch, transformers) -> int:
    model_dir = Path(args.model_dir) if args.model_dir else synth_model(args.preset, work, args.seed)
    n_prompts = max(max(args.levels) * 2, args.sequential_requests, 4)
    prompts = make_prompts(model_dir, n_prompts, args.prompt_tokens)
    max_total = args.prompt_tokens + args.new_tokens + 8
    report: dict[str, Any] = {
        "benchmark": "model_server_throughput", "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "preset": args.preset if not args.model_dir else str(args.model_dir), "engines": args.engines,
        "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "levels": args.levels,
        "paper_rho_sys_tokens_per_s_per_gb": PAPER_RHO_SYS,
        "environment": {"device": device, "device_name": device_name, "torch": torch.__version__,
                        "transformers": transformers.__version__, "python": platform.python_version(),
                        "cpus": os.cpu_count()},
        "variants": [],
    }

    def save() -> None:
        (out / "model_server_throughput.json").write_text(json.dumps(report, indent=2) + "\n")
        (out / "model_server_throughput.md").write_text(render_markdown(report))

    for quant in args.quants:
        serve_dir = model_dir
        if quant == "gptq":
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(model_dir)
            gdir, why = maybe_make_gptq(model_dir, work, [tok.decode(p) for p in prompts[:32]])
            if gdir is None:
                report["variants"].append({"quantization": quant, "engine": "-", "skipped": why})
                log(f"gptq skipped: {why}")
                save()
                continue
            serve_dir = gdir
        log(f"[{quant}] sequential model.generate baseline ({args.sequential_requests} requests)")
        try:
            seq = sequential_generate(serve_dir, quant, device, prompts, args.new_tokens, args.sequential_requests)
        except Exception as exc:
            why = f"baseline failed: {type(exc).__name__}: {str(exc)[:300]}"
            report["variants"].append({"quantization": quant, "engine": "-", "skipped": why})
            log(why)
            save()
            continue
        for engine in args.engines:
            variant: dict[str, Any] = {"quantization": quant, "engine_requested": engine, "engine": engine,
                                       "sequential": seq, "weight_bytes": seq["weight_bytes"], "levels": []}
            report["variants"].append(variant)
            log(f"[{quant}/{engine}] starting server (device {device})")
            srv = Server(serve_dir, quant, engine, device, max(args.levels), max_total,
                         out / f"server-{quant}-{engine}.log")
            try:
                info = srv.wait_ready(args.ready_timeout)
                variant.update(engine=info.get("engine"), weight_bytes=info["weight_bytes"], dtype=info.get("dtype"),
                               server_startup=info.get("startup"),
                               load_energy_joules=info.get("load_energy_joules"), devices=info.get("devices"))
                uuids = [d["uuid"] for d in info.get("devices") or [] if d.get("uuid")]
                asyncio.run(run_level(srv.url, info["model_id"], prompts, 2, 2, min(8, args.new_tokens)))  # warm-up
                for c in args.levels:
                    n_req = max(4, int(round(args.requests_factor * c)))
                    e0 = _energy_mj(uuids)
                    lvl = asyncio.run(run_level(srv.url, info["model_id"], prompts, c, n_req, args.new_tokens))
                    e1 = _energy_mj(uuids)
                    if e0 and e1:
                        joules = sum(max(0, e1[u] - e0[u]) for u in e0) / 1000.0
                        lvl["energy_joules"] = joules
                        lvl["joules_per_token"] = (joules / lvl["completion_tokens"]
                                                   if lvl["completion_tokens"] else None)
                    lvl["rho_sys"] = lvl["tokens_per_s"] / (info["weight_bytes"] / 1e9)
                    lvl["ratio_vs_sequential"] = lvl["tokens_per_s"] / seq["tokens_per_s"]
                    variant["levels"].append(lvl)
                    log(f"[{quant}/{variant['engine']}] c={c}: {lvl['tokens_per_s']:.1f} tokens/s "
                        f"({lvl['ratio_vs_sequential']:.2f}x sequential), TTFT p50 {lvl['ttft_p50_s'] * 1e3:.1f} ms")
                    save()
            except Exception as exc:
                variant["skipped"] = f"server run failed: {type(exc).__name__}: {str(exc)[:300]}"
                log(variant["skipped"])
            finally:
                srv.stop()
            at32 = [lvl for lvl in variant["levels"] if lvl["concurrency"] == 32]
            variant["target_at_32"] = at32[0]["ratio_vs_sequential"] if at32 else None
            save()

    save()
    print_table(report)
    log(f"wrote {out / 'model_server_throughput.json'} and {out / 'model_server_throughput.md'}")
    ok = any(not v.get("skipped") for v in report["variants"])
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
