"""Cold start, spawn to first token, before and after the cold-start changes, bf16 and int4, side by side in one run.

Each variant spawns ``model-server serve MODEL --engine fast`` with its own environment, polls
``/health`` every 20 ms, sends one streaming completion the moment it is ready, and reads the phases
from ``/info``'s ``startup`` (process start, load start / sub-phases / end, warm-up end, ready,
``fused_ready``; wall-clock epochs). Then it waits for the fused path (``fused_ready``), sends a
64-token request (captures its lazy graphs) and times a second one (the steady state).

* ``fill-cache`` / ``fill-cache-int4``: the old path (below) on an empty persistent compile cache,
  which they fill (a fresh machine has none; an image or volume would carry it);
* ``before`` / ``before-int4``: today's path before issue 17's load and warm-up changes, with that
  cache: ``from_pretrained`` (``MODEL_SERVER_DIRECT_LOAD=0``), compile in the warm-up phase
  (``MODEL_SERVER_FAST_BACKGROUND_WARMUP=0``), lazy graphs;
* ``after`` / ``after-int4``: the defaults: direct safetensors load, background warm-up (first
  requests eager, then fused + lazy graphs), same cache;
* ``after-noprewarm`` / ``after-noprewarm-int4``: the defaults without the kernel pre-warm during the load
  (``MODEL_SERVER_PREWARM=0``) and with the background compile starting at ready
  (``MODEL_SERVER_FAST_WARMUP_HOLD_S=0``): the "after" of commit 447c2a7, for an A/B in one call;
* ``after-empty-cache``: the defaults on an empty compile cache (a new one per run);
* ``seeded`` / ``seeded-int4``: the defaults on an empty compile cache (a new one per run) with
  ``MODEL_SERVER_COMPILE_CACHE_SEED`` pointing at a cache ``model-server compile-cache fill`` filled (once per
  quantization, first; its seconds are in the report's ``seed_fills``): a container image's first start;
* ``seeded-nodefer`` / ``after-nodefer``: ``seeded`` / ``after`` with the background compile starting right after
  the first prefill and the thread switch interval left alone (``MODEL_SERVER_FAST_WARMUP_MAX_DEFER_S=0``,
  ``MODEL_SERVER_FAST_WARMUP_SWITCH_INTERVAL_S=0``): the behaviour before the compile waited for served
  requests, for an A/B of the first request's length (``first_request_s``) in one call;
* ``seeded-earlycuda`` / ``seeded-earlycuda-int4``: ``seeded`` with ``MODEL_SERVER_EARLY_CUDA_INIT=1`` (CUDA's
  driver initialised on a thread while torch imports; compare the phases ``torch_to_device_s`` and ``imports_s``);
* ``seeded-staged`` / ``seeded-staged-int4``: ``seeded`` with ``MODEL_SERVER_STAGED_READ=1`` (the weights read through
  pinned staging buffers, :mod:`model_server.staged_read`; compare ``read_s`` and ``load_s``);
* ``seeded-nobytecode`` / ``seeded-nobytecode-int4``: ``seeded`` with ``MODEL_SERVER_BYTECODE_CACHE=0`` (torch's
  Python compiled on every start where the install shipped no bytecode, :mod:`model_server.bytecode_cache`;
  compare ``to_torch_s``);
* ``seeded-fastops`` / ``seeded-fastops-int4``: ``seeded`` with the fused ops compiled for fixed row counts and the
  Triton residual add + RMSNorm set explicitly (``MODEL_SERVER_FAST_COMPILE_SHAPES=rows``, ``MODEL_SERVER_FAST_NORM=
  triton``: the defaults since 2026-12-07), from a seed filled with them (a seed of its own per quantization: they
  change what is compiled); ``seeded-dynops`` / ``seeded-dynops-int4``: the same with the defaults before
  (``dynamic``, ``compiled``); ``seeded-rowsonly`` / ``seeded-normonly`` (and ``-int4``): one of the two switches
  alone (``rows`` + ``compiled``; ``dynamic`` + ``triton``), each from a seed of its own;
* ``seeded-noprefetch`` / ``seeded-noprefetch-int4`` / ``after-noprefetch``: ``seeded`` / ``after`` with ``MODEL_SERVER_PREFETCH_WEIGHTS=0`` (the
  checkpoint read only by the load, :mod:`model_server.weights_prefetch`); with ``--evict-weights`` every start
  first drops the weights from the page cache, as on a node whose disk has not served the model;
* ``legacy-eager-graphs``: the old path with every graph captured at start (the 2026-12-03 "before");
* ``after-tf`` / ``after-tf-int4``: the defaults with transformers' model and tokenizer
  (``MODEL_SERVER_NO_TRANSFORMERS=0``: the "after" of b69463c), beside ``after`` / ``after-int4``, which now
  build both without transformers where :mod:`model_server.native` applies (the llama-3.2-1b preset).

A variant may be named more than once (``after,after-tf,after,after-tf``: alternating repeats). Each run
records from ``/info`` its load path, its tokenizer and whether ``transformers`` was imported in the server
process after the first request and at the end. The first request's greedy tokens are compared across bf16
variants and across int4 variants (serving eagerly first and the native build must not change them), and so
are the steady requests'. Writes ``cold_start_phases.json``, ``cold_start_phases.md`` and the servers' logs
in one ``cold_logs.tgz`` under ``--out`` (few files: the device tool brings back at most 8).
GPU: ``python benchmarks/cold_start_phases.py --out OUT``; CPU: ``--model-dir /tmp/m1b --device cpu
--variants after-tf,after --steady-tokens 0 --importtime`` (``-X importtime`` in the server: the top
imports per run in the JSON).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from model_server_process import synth_model  # noqa: E402
from support import default_commit, free_port, stop_process, utc_date, wait_http_ok  # noqa: E402
from cold_phases_report import pack_logs, write_report  # noqa: E402


def first_token(url: str, model: str, prompt: list[int], n: int) -> tuple[float, float, list[str]]:
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True,
                       "stream": True}).encode()
    req = urllib.request.Request(url + "/v1/completions", data=body, headers={"Content-Type": "application/json"})
    t_first, texts = None, []
    with urllib.request.urlopen(req, timeout=300) as r:
        for raw in r:
            line = raw.strip()
            if line.startswith(b"data: ") and line != b"data: [DONE]":
                d = json.loads(line[6:])
                if d.get("choices"):
                    t_first = t_first or time.time()
                    texts.append(d["choices"][0].get("text", ""))
    return t_first or time.time(), time.time(), texts


def wait_fused(url: str, timeout_s: float) -> dict:
    """``/info`` once the engine runs its fused path (``startup.fused_ready``) or ``timeout_s`` passed."""
    deadline = time.time() + timeout_s
    while True:
        with urllib.request.urlopen(url + "/info", timeout=10) as r:
            info = json.load(r)
        if info.get("engine_warm") is not False or time.time() > deadline:   # True at once without background
            return info
        time.sleep(0.1)


PHASES = [("imports_s", "process_start", "load_start"),
          # imports_s in four: to listening (Python, the server's modules, NVML's GPU list), the compile cache seed +
          # import torch, the device check (cuInit on a GPU), NVML's energy read + importing the engine
          ("to_listening_s", "process_start", "listening"), ("prefetch_s", "listening", "weights_prefetched"), ("to_torch_s", "listening", "torch_imported"),
          ("torch_to_device_s", "torch_imported", "device_ready"), ("device_to_load_s", "device_ready", "load_start"), ("cuda_init_s", "load_start", "cuda_init_end"),
          ("read_s", "load_start", "read_end"), ("build_s", "load_start", "build_end"),
          ("prewarm_s", "load_start", "prewarm_end"), ("quantize_s", "quantize_start", "quantize_end"),
          ("load_s", "load_start", "load_end"),
          ("warmup_s", "load_end", "warmup_end"),
          ("ready_to_compile_s", "ready", "fused_compile_start"), ("compile_s", "fused_compile_start", "fused_ready")]


def evict_weights(model_dir: Path) -> int:
    """Ask the kernel to drop ``model_dir``'s safetensors files from the page cache (clean pages go; a file
    another process maps stays); returns the bytes advised."""
    total = 0
    for path in sorted(model_dir.glob("*.safetensors")):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            total += os.fstat(fd).st_size
        finally:
            os.close(fd)
    return total


def _info(url: str) -> dict:
    with urllib.request.urlopen(url + "/info", timeout=10) as r:
        return json.load(r)


def import_times(log: str, top: int = 12) -> list[tuple[str, float]]:
    """``-X importtime`` lines of the server's log: the ``top`` top-level imports by cumulative seconds."""
    rows = []
    for ln in log.splitlines():
        if ln.startswith("import time:") and ln.count("|") == 2:
            _, cum, name = ln.split("|")
            if not name.startswith("  ") and cum.strip().isdigit():
                rows.append((name.strip(), int(cum) / 1e6))
    return sorted(rows, key=lambda r: -r[1])[:top]


def one_start(name: str, model_dir: Path, device: str, quant: str, env: dict, logs: Path, steady_tokens: int = 64,
              importtime: bool = False) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, *(["-X", "importtime"] if importtime else []), "-m", "model_server", "serve",
           str(model_dir), "--port", str(port), "--device", device, "--engine", "fast", "--quantization", quant,
           "--max-batch", "64", "--max-total-tokens", "256"]
    log_path = logs / f"cold_{name}.log"
    logf = open(log_path, "w")
    t_spawn = time.time()
    proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env={**os.environ, **env, "PYTHONUNBUFFERED": "1"})
    res: dict = {"variant": name.split("_", 1)[1], "quantization": quant, "env": env}
    try:
        wait_http_ok(url + "/health", 240, proc=proc, name="server", interval=0.02)
        t_health = time.time()
        t_first, t_done, texts = first_token(url, str(model_dir), list(range(300, 364)), 16)
        first = _info(url)
        res.update(load_path=first.get("load_path"), tokenizer=first.get("tokenizer"),
                   transformers_after_first_request=first.get("transformers_imported"),
                   seed_copied_files=(first.get("compile_cache") or {}).get("copied_files"),
                   bytecode=(first.get("bytecode_cache") or {}).get("mode"))
        info, t_fused, steady, t2 = first, time.time(), None, None
        if steady_tokens > 0:
            # the old path has no background warm-up: it is fused from ready on, nothing to wait for
            info = wait_fused(url, 240 if env.get("MODEL_SERVER_FAST_BACKGROUND_WARMUP") != "0" else 0)
            t_fused = time.time()
            first_token(url, str(model_dir), list(range(400, 400 + steady_tokens)), steady_tokens)   # lazy captures
            t2 = time.time()
            _, _, steady = first_token(url, str(model_dir), list(range(400, 400 + steady_tokens)), steady_tokens)
        st = info.get("startup") or {}
        fused = st.get("fused_ready") or st.get("warmup_end")
        res.update(spawn_to_first_token_s=round(t_first - t_spawn, 3), spawn_to_ready_s=round(t_health - t_spawn, 3),
                   first_request_s=round(t_done - t_health, 3),
                   second_request_s=round(time.time() - t2, 3) if t2 else None,
                   spawn_to_fused_s=round(fused - t_spawn, 3) if fused and steady_tokens > 0 else None,
                   waited_for_fused_s=round(t_fused - t_done, 3), tokens=texts, steady_tokens=steady,
                   transformers_at_end=_info(url).get("transformers_imported"))
        ph = [("spawn_to_process_start_s", t_spawn, st.get("process_start"))]
        ph += [(k, st.get(a), st.get(b)) for k, a, b in PHASES]
        ph += [("ready_to_first_token_s", t_health, t_first)]
        res["phases"] = {k: round(b - a, 3) for k, a, b in ph if a is not None and b is not None}
        res["weight_bytes"] = info.get("weight_bytes")
        if res.get("load_path") is None:        # servers older than /info's load_path: their log line
            res["load_path"] = next((ln.split("load path: ")[1].split(" (")[0] for ln in
                                     log_path.read_text().splitlines() if "load path: " in ln), None)
    except Exception as exc:  # noqa: BLE001 - recorded
        res["error"] = f"{type(exc).__name__}: {exc}"[:300]
    finally:
        stop_process(proc, timeout=30)
        logf.close()
    if importtime:
        res["imports_top_s"] = import_times(log_path.read_text(errors="replace"))
    print(json.dumps({k: v for k, v in res.items() if k not in ("tokens", "steady_tokens", "imports_top_s")}),
          flush=True)
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--preset", default="llama-3.2-1b")
    ap.add_argument("--model-dir", default=None)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--variants", default=os.environ.get("COLD_VARIANTS") or "fill-cache,fill-cache-int4,before,"
                    "after,before-int4,after-int4,after-empty-cache", help="comma-separated (default: $COLD_VARIANTS, "
                    "else fill-cache,fill-cache-int4,before,after,before-int4,after-int4,after-empty-cache)")
    ap.add_argument("--commit", default=default_commit())
    ap.add_argument("--steady-tokens", type=int, default=64,
                    help="tokens of the two requests after the fused path (0: neither them nor the wait; CPU)")
    ap.add_argument("--importtime", action="store_true", help="run the server with python -X importtime")
    ap.add_argument("--evict-weights", action="store_true",
                    help="drop the model's safetensors files from the page cache before each start (a node whose "
                         "disk has not served the model: posix_fadvise DONTNEED)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="cold_"))
    model_dir = Path(args.model_dir) if args.model_dir else synth_model(args.preset, work, 0)
    card = "cpu"
    if args.device == "cuda":
        card = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                              text=True).stdout.strip()
    persistent = str(work / "persistent-cache")

    def fresh() -> dict:
        d = tempfile.mkdtemp(prefix="empty_cache_", dir=work)
        return {"TORCHINDUCTOR_CACHE_DIR": d, "TRITON_CACHE_DIR": d + "/triton"}
    warm = {"TORCHINDUCTOR_CACHE_DIR": persistent, "TRITON_CACHE_DIR": persistent + "/triton"}
    old = {"MODEL_SERVER_DIRECT_LOAD": "0", "MODEL_SERVER_FAST_BACKGROUND_WARMUP": "0",
           "MODEL_SERVER_FAST_LAZY_GRAPHS": "1"}
    new = {"MODEL_SERVER_DIRECT_LOAD": "1", "MODEL_SERVER_FAST_BACKGROUND_WARMUP": "1",
           "MODEL_SERVER_NO_TRANSFORMERS": "1"}
    tf = {**new, "MODEL_SERVER_NO_TRANSFORMERS": "0"}          # transformers' model and tokenizer (b69463c)
    r16 = {"MODEL_SERVER_PREWARM": "0", "MODEL_SERVER_FAST_WARMUP_HOLD_S": "0"}     # 447c2a7's "after"
    nodefer = {"MODEL_SERVER_FAST_WARMUP_MAX_DEFER_S": "0", "MODEL_SERVER_FAST_WARMUP_SWITCH_INTERVAL_S": "0"}
    seeds: dict[str, str] = {}

    def seeded(quant: str, compiled: str = "", extra: dict | None = None) -> dict:
        """An empty cache and ``MODEL_SERVER_COMPILE_CACHE_SEED``: a seed filled once per quantization by
        ``model-server compile-cache fill`` (its seconds go in the report) with the defaults' switches, or, for a
        mod named in ``compiled`` (one that changes what is compiled), with ``extra`` too, in a seed of its own."""
        extra = extra or {}
        key = f"{quant}-{compiled}" if compiled else quant
        if key not in seeds:
            seeds[key] = str(work / f"seed-{key}")
            t0 = time.monotonic()
            fill = subprocess.run([sys.executable, "-m", "model_server", "compile-cache", "fill", str(model_dir),
                                   "--out", seeds[key], "--device", args.device, "--engine", "fast",
                                   "--quantization", quant, "--max-batch", "64", "--max-total-tokens", "256",
                                   "--quiet"], env={**os.environ, **new, **(extra if compiled else {})},
                                  capture_output=True, text=True)
            report.setdefault("seed_fills", []).append(
                {"quantization": quant, "seed": key, "rc": fill.returncode,
                 "seconds": round(time.monotonic() - t0, 1),
                 "stdout": fill.stdout.strip()[-300:], "stderr": fill.stderr.strip()[-300:]})
        return {**fresh(), **new, "MODEL_SERVER_COMPILE_CACHE_SEED": seeds[key], **extra}

    # seeded-<mod> / seeded-<mod>-int4: a seeded start with one switch changed
    mods = {"nodefer": nodefer, "earlycuda": {"MODEL_SERVER_EARLY_CUDA_INIT": "1"},
            "staged": {"MODEL_SERVER_STAGED_READ": "1"}, "nobytecode": {"MODEL_SERVER_BYTECODE_CACHE": "0"},
            "noprefetch": {"MODEL_SERVER_PREFETCH_WEIGHTS": "0"},
            "fastops": {"MODEL_SERVER_FAST_COMPILE_SHAPES": "rows", "MODEL_SERVER_FAST_NORM": "triton"},
            "dynops": {"MODEL_SERVER_FAST_COMPILE_SHAPES": "dynamic", "MODEL_SERVER_FAST_NORM": "compiled"},
            "rowsonly": {"MODEL_SERVER_FAST_COMPILE_SHAPES": "rows", "MODEL_SERVER_FAST_NORM": "compiled"},
            "normonly": {"MODEL_SERVER_FAST_COMPILE_SHAPES": "dynamic", "MODEL_SERVER_FAST_NORM": "triton"}}
    compiled_mods = {"fastops", "dynops", "rowsonly", "normonly"}   # change what is compiled: a seed of their own
    lazy = {"after-empty-cache": lambda: ("bf16", {**fresh(), **new}),
            "seeded": lambda: ("bf16", seeded("bf16")), "seeded-int4": lambda: ("int4", seeded("int4"))}
    for mod, extra in mods.items():
        for quant, suffix in (("bf16", ""), ("int4", "-int4")):
            lazy[f"seeded-{mod}{suffix}"] = lambda q=quant, m=mod, e=extra: (
                q, seeded(q, m if m in compiled_mods else "", e))
    plan = {"fill-cache": ("bf16", {**warm, **old}), "fill-cache-int4": ("int4", {**warm, **old}),
            "before": ("bf16", {**warm, **old}), "after": ("bf16", {**warm, **new}),
            "before-int4": ("int4", {**warm, **old}), "after-int4": ("int4", {**warm, **new}),
            "after-noprewarm": ("bf16", {**warm, **new, **r16}), "after-noprewarm-int4": ("int4", {**warm, **new, **r16}),
            "legacy-eager-graphs": ("bf16", {**warm, **old, "MODEL_SERVER_FAST_LAZY_GRAPHS": "0"}),
            "after-tf": ("bf16", {**warm, **tf}), "after-tf-int4": ("int4", {**warm, **tf}),
            "after-noprefetch": ("bf16", {**warm, **new, **mods["noprefetch"]}),
            "after-nodefer": ("bf16", {**warm, **new, **nodefer}), "after-nodefer-int4": ("int4", {**warm, **new, **nodefer})}
    report = {"card": card, "date": utc_date("%Y-%m-%d"), "commit": args.commit,
              "command": "python benchmarks/cold_start_phases.py " + " ".join(sys.argv[1:]), "preset": args.preset,
              "runs": []}
    names = [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in plan and n not in lazy]
    if unknown:
        ap.error(f"unknown variant(s) {unknown}; known: {', '.join([*plan, *lazy])}")
    logs = work / "logs"
    logs.mkdir()
    md = ""
    for i, name in enumerate(names):
        quant, env = plan[name] if name in plan else lazy[name]()     # lazy: a fresh empty cache per run
        if args.evict_weights:
            evict_weights(model_dir)
        report["runs"].append(one_start(f"{i:02d}_{name}", model_dir, args.device, quant, env, logs,
                                        args.steady_tokens, args.importtime))
        md = write_report(report, out)          # after every run: a call cut off by its time limit keeps them
        pack_logs(logs, out)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
