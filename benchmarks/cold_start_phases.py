"""Cold start, spawn to first token, before and after the cold-start changes, side by side in one run.

Each variant spawns ``model-server serve MODEL --engine fast`` with its own environment, polls
``/health`` every 20 ms, sends one streaming completion the moment it is ready, and reads the phases
from ``/info``'s ``startup`` (process start, load start/end, warm-up end, ready; wall-clock epochs):

* ``before``: empty compile caches (a fresh machine or container), every CUDA graph captured at start;
* ``after-first-boot``: empty caches, graphs captured lazily (``MODEL_SERVER_FAST_LAZY_GRAPHS=1``);
  this start fills the persistent cache folder;
* ``after``: that cache folder (as shipped in an image or kept on a volume), lazy graphs;
* ``warm-cache-eager-graphs``: that cache, every graph at start (separates the two changes);
* ``after-int4``: the same as ``after`` with ``--quantization int4``.

The first request's greedy tokens are compared across bf16 variants (lazy capture must not change
them). Writes ``cold_start_phases.json`` under ``--out``.
GPU: ``python benchmarks/cold_start_phases.py --out OUT``; CPU smoke: ``--preset tiny --device cpu``.
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


def one_start(name: str, model_dir: Path, device: str, quant: str, env: dict, out: Path) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "model_server", "serve", str(model_dir), "--port", str(port), "--device", device,
           "--engine", "fast", "--quantization", quant, "--max-batch", "64", "--max-total-tokens", "256"]
    logf = open(out / f"cold_{name}.log", "w")
    t_spawn = time.time()
    proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env={**os.environ, **env, "PYTHONUNBUFFERED": "1"})
    res: dict = {"variant": name, "quantization": quant, "env": env}
    try:
        wait_http_ok(url + "/health", 240, proc=proc, name="server", interval=0.02)
        t_health = time.time()
        t_first, t_done, texts = first_token(url, str(model_dir), list(range(300, 364)), 16)
        t2 = time.time()
        first_token(url, str(model_dir), list(range(400, 464)), 64)        # a second request: later buckets
        with urllib.request.urlopen(url + "/info", timeout=10) as r:
            info = json.load(r)
        st = info.get("startup") or {}
        res.update(spawn_to_first_token_s=round(t_first - t_spawn, 3), spawn_to_ready_s=round(t_health - t_spawn, 3),
                   first_request_s=round(t_done - t_health, 3), second_request_s=round(time.time() - t2, 3),
                   tokens=texts)
        ph = [("spawn_to_process_start_s", t_spawn, st.get("process_start")),
              ("imports_s", st.get("process_start"), st.get("load_start")),
              ("load_s", st.get("load_start"), st.get("load_end")),
              ("warmup_s", st.get("load_end"), st.get("warmup_end")),
              ("ready_to_first_token_s", t_health, t_first)]
        res["phases"] = {k: round(b - a, 3) for k, a, b in ph if a is not None and b is not None}
        res["weight_bytes"] = info.get("weight_bytes")
    except Exception as exc:  # noqa: BLE001 - recorded
        res["error"] = f"{type(exc).__name__}: {exc}"[:300]
    finally:
        stop_process(proc, timeout=30)
        logf.close()
    print(json.dumps({k: v for k, v in res.items() if k != "tokens"}), flush=True)
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--preset", default="llama-3.2-1b")
    ap.add_argument("--model-dir", default=None)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--variants", default="before,after-first-boot,after,warm-cache-eager-graphs,after-int4")
    ap.add_argument("--commit", default=default_commit())
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
    plan = {"before": ("bf16", {**fresh(), "MODEL_SERVER_FAST_LAZY_GRAPHS": "0"}),
            "after-first-boot": ("bf16", {**warm, "MODEL_SERVER_FAST_LAZY_GRAPHS": "1"}),
            "after": ("bf16", {**warm, "MODEL_SERVER_FAST_LAZY_GRAPHS": "1"}),
            "warm-cache-eager-graphs": ("bf16", {**warm, "MODEL_SERVER_FAST_LAZY_GRAPHS": "0"}),
            "after-int4": ("int4", {**warm, "MODEL_SERVER_FAST_LAZY_GRAPHS": "1"})}
    report = {"card": card, "date": utc_date("%Y-%m-%d"), "commit": args.commit,
              "command": "python benchmarks/cold_start_phases.py " + " ".join(sys.argv[1:]), "preset": args.preset,
              "runs": []}
    for name in args.variants.split(","):
        quant, env = plan[name]
        if name == "after-first-boot" and Path(persistent).exists():
            raise SystemExit("persistent cache folder is not empty")
        report["runs"].append(one_start(name, model_dir, args.device, quant, env, out))
        (out / "cold_start_phases.json").write_text(json.dumps(report, indent=1))
    bf = [r for r in report["runs"] if r["quantization"] == "bf16" and "tokens" in r]
    report["first_request_tokens_identical_across_bf16_variants"] = len({json.dumps(r["tokens"]) for r in bf}) == 1
    (out / "cold_start_phases.json").write_text(json.dumps(report, indent=1))
    for r in report["runs"]:
        print(f"{r['variant']:26} spawn->first token {r.get('spawn_to_first_token_s')} s  {r.get('phases')} "
              f"{r.get('error', '')}")
    print("tokens identical across bf16 variants:", report["first_request_tokens_identical_across_bf16_variants"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
