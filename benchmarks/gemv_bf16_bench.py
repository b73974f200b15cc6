"""The one-row bf16 GEMV kernel (model_server/gemv_bf16.py) against cuBLAS (``F.linear``) on the 1B preset's decode
shapes, on a GPU (issue 17: ITL at one stream).

For each shape, ``--copies`` weight copies (enough that they do not all fit in L2, as a step's 16 layers do not), one
CUDA graph of 2 x copies calls cycling through them, replayed ``--reps`` times: median microseconds per call and the
weight bytes read per second. Every configuration of :data:`gemv_bf16.CONFIGS` is checked against an fp32 reference
first (max |error| over the largest |output|; cuBLAS's own error printed next to it). Then the linears of one decode
step at one row (16 layers x (q/k/v + o + gate/up + down) + LM head): cuBLAS, the default configuration and the best
per shape.

Usage: ``python benchmarks/gemv_bf16_bench.py --out DIR`` (writes ``DIR/gemv_bf16.json``; a table on stdout).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model_server import gemv_bf16  # noqa: E402

SHAPES = {"qkv_proj": (3072, 2048), "o_proj": (2048, 2048), "gate_up_proj": (16384, 2048),
          "down_proj": (2048, 8192), "lm_head": (128256, 2048)}
PER_STEP = {"qkv_proj": 16, "o_proj": 16, "gate_up_proj": 16, "down_proj": 16, "lm_head": 1}


def time_calls(fn, copies: int, reps: int) -> float:
    """Median us per call of ``fn(i)`` for i cycling over ``copies``, from a CUDA graph of 2 x copies calls."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for i in range(copies):
            fn(i)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(2 * copies):
            fn(i % copies)
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3 / (2 * copies))
    return statistics.median(times)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--shapes", default=",".join(SHAPES), help=f"of {', '.join(SHAPES)}")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--l2-multiple", type=float, default=8.0, help="weight copies of at least this many L2 sizes")
    ap.add_argument("--commit", default="unknown")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("gemv_bf16_bench: needs a CUDA GPU", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    l2 = getattr(props, "L2_cache_size", 50 * 2**20)
    err = gemv_bf16.check(dev)
    print(f"card {props.name}, L2 {l2 / 2**20:.0f} MiB, check: {err or 'ok'}", flush=True)
    if err:
        return 1
    gen = torch.Generator(device=dev).manual_seed(0)
    rows, step = [], {"cublas": 0.0, "default": 0.0, "best": 0.0}
    for name in args.shapes.split(","):
        n, k = SHAPES[name]
        nbytes = n * k * 2
        copies = max(2, min(16, int(args.l2_multiple * l2 / nbytes) + 1))
        ws = [(torch.randn(n, k, generator=gen, device=dev) * 0.05).to(torch.bfloat16) for _ in range(copies)]
        x = torch.randn(1, k, generator=gen, device=dev).to(torch.bfloat16)
        ref = x.float() @ ws[0].float().T
        scale = float(ref.abs().max())
        row = {"shape": name, "n": n, "k": k, "copies": copies,
               "cublas_rel_err": float((F.linear(x, ws[0]).float() - ref).abs().max()) / scale}
        row["cublas_us"] = time_calls(lambda i: F.linear(x, ws[i]), copies, args.reps)
        cfgs = {}
        for cfg in gemv_bf16.CONFIGS:
            e = float((gemv_bf16.gemv(x, ws[0], cfg).float() - ref).abs().max()) / scale
            us = time_calls(lambda i, c=cfg: gemv_bf16.gemv(x, ws[i], c), copies, args.reps)
            cfgs[cfg.name()] = {"us": round(us, 2), "rel_err": e}
        row["configs"] = cfgs
        default = gemv_bf16.choose(n, k).name()
        best = min(cfgs, key=lambda c: cfgs[c]["us"])
        row.update(default=default, default_us=cfgs[default]["us"], best=best, best_us=cfgs[best]["us"])
        for key, us in (("cublas", row["cublas_us"]), ("default", row["default_us"]), ("best", row["best_us"])):
            step[key] += PER_STEP[name] * us
        rows.append(row)
        print(f"{name} {n}x{k} ({copies} copies): cuBLAS {row['cublas_us']:.2f} us ({nbytes / row['cublas_us'] / 1e6:.2f} "
              f"TB/s, err {row['cublas_rel_err']:.1e}); default {default} {row['default_us']:.2f} us "
              f"({nbytes / row['default_us'] / 1e6:.2f} TB/s); best {best} {row['best_us']:.2f} us "
              f"(err {cfgs[best]['rel_err']:.1e})", flush=True)
    print(f"linears of a one-row step (16 layers + LM head), us: cuBLAS {step['cublas']:.1f}, GEMV default "
          f"{step['default']:.1f}, GEMV best per shape {step['best']:.1f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gemv_bf16.json").write_text(json.dumps({
        "card": props.name, "torch": torch.__version__, "commit": args.commit, "command": " ".join(sys.argv),
        "rows": rows, "step_us": step}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
