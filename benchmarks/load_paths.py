"""``model_server.loading.load_model`` by both load paths (direct safetensors vs ``from_pretrained``), each in a fresh process.

For each (path, quantization) it starts one Python process that imports torch and transformers
(timed), calls ``load_model`` (timed, with its sub-phase marks: cuda_init_end, read_end, build_end,
quantize_end) and, with ``--check``, compares against the other path: every tensor equal and the
same greedy tokens. Writes ``load_paths.json`` under ``--out``.
CPU: ``python benchmarks/load_paths.py --model-dir /tmp/m1b --device cpu --out OUT``.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, os, sys, time
t0 = time.time()
import torch, transformers  # noqa: F401
t1 = time.time()
from model_server.loading import load_model
m = load_model(sys.argv[1], sys.argv[2], sys.argv[3])
t2 = time.time()
ids = torch.tensor([[1, 7, 42, 99, 1000]], device=m.model.device)
with torch.inference_mode():
    out = m.model.generate(ids, max_new_tokens=8, do_sample=False)[0, 5:].tolist()
print(json.dumps({"imports_s": round(t1 - t0, 3), "load_s": round(t2 - t1, 3), "path": m.load_path,
                  "marks_s": {k: round(v - t1, 3) for k, v in m.load_marks.items()},
                  "weight_bytes": m.weight_bytes, "greedy": out}))
"""


def one(model_dir: str, device: str, quant: str, direct: bool) -> dict:
    env = {**os.environ, "MODEL_SERVER_DIRECT_LOAD": "1" if direct else "0", "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-c", CHILD, model_dir, device, quant], capture_output=True, text=True,
                       env=env, timeout=900)
    if r.returncode != 0:
        return {"error": r.stderr.strip().splitlines()[-1][:300] if r.stderr.strip() else f"rc {r.returncode}"}
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quants", default="bf16,int4")
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    for quant in args.quants.split(","):
        for rep in range(args.reps):
            for direct in (False, True):
                res = {"quantization": quant, "direct_load": direct, "rep": rep, **one(args.model_dir, args.device,
                                                                                         quant, direct)}
                print(json.dumps(res), flush=True)
                runs.append(res)
    same = {q: len({json.dumps(r.get("greedy")) for r in runs if r["quantization"] == q}) == 1
            for q in args.quants.split(",")}
    report = {"device": args.device, "model_dir": args.model_dir, "command": "python benchmarks/load_paths.py "
              + " ".join(sys.argv[1:]), "runs": runs, "greedy_identical_across_paths": same}
    (out / "load_paths.json").write_text(json.dumps(report, indent=1))
    print("greedy tokens identical across paths:", same)
    return 0


if __name__ == "__main__":
    sys.exit(main())
