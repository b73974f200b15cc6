"""benchmarks/int4_kernels.py --redispatch: a recorded result's linears re-summed as today's dispatch runs them."""
from __future__ import annotations

import json
import random
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

from model_server import int4_triton

ROOT = Path(__file__).resolve().parents[1]
LAYER = {"qkv_proj": (3072, 2048), "o_proj": (2048, 2048), "gate_up_proj": (16384, 2048), "down_proj": (2048, 8192)}
HEAD = (128256, 2048)


def test_redispatch_sums_each_layer_as_dispatched(tmp_path):
    """At 8 rows the merged gate/up and the LM head run the Triton GEMM (wide layers), the rest int4pack; a Triton
    layer is timed by the swept row of today's config, not by the recorded default-config cell."""
    rnd = random.Random(7)
    cells, sweeps, want = [], {}, 0.0
    for (n, k), times in [*((s, 16) for s in LAYER.values()), (HEAD, 1)]:
        t = {m: round(rnd.uniform(5, 200), 3) for m in ("bf16", "tinygemm", "triton")}
        cells += [{"n": n, "k": k, "m": 8, "method": m, "graph_us": us, "eager_us": us * 3} for m, us in t.items()]
        cfg = asdict(int4_triton.choose_config(8, n, k, 128, 132))
        swept = round(rnd.uniform(5, 200), 3)
        sweeps[f"{n}x{k}/M8"] = [{"method": "triton", "config": cfg, "rel_err": 1e-3, "graph_us": swept},
                                 {"method": "triton", "config": {**cfg, "fold": not cfg["fold"]}, "rel_err": 1e-3,
                                  "graph_us": swept / 2}]                   # another config: must not be taken
        want += times * (swept if n >= 16384 else t["tinygemm"])
    res = {"device": "test card", "group": 128, "num_sms": 132, "ms": [8], "shapes": {"lm_head": list(HEAD)},
           "cells": cells, "sweeps": sweeps, "rel_errors": {},
           "stack": {"8": {"bf16/graph_us": 1000.0, "dispatch/graph_us": 1234.5}}}
    path = tmp_path / "int4_kernels.json"
    path.write_text(json.dumps(res))
    r = subprocess.run([sys.executable, "benchmarks/int4_kernels.py", "--redispatch", str(path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    row = [ln for ln in r.stdout.splitlines() if ln.startswith("| 8 |")]
    assert row == [f"| 8 | 1000.0 | 1234.5 | {want:.1f} | {1000.0 / want:.3f}x |"], r.stdout

    path.write_text("{not json")
    r = subprocess.run([sys.executable, "benchmarks/int4_kernels.py", "--redispatch", str(path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "cannot re-sum" in r.stderr
