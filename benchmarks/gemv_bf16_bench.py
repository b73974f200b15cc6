"""The bf16 GEMV kernel (model_server/gemv_bf16.py) against cuBLAS (``F.linear``) on the 1B preset's decode shapes at
1..8 rows of x, on a GPU (issue 17: ITL at one stream, and at 2-8 streams with ``MODEL_SERVER_FAST_GEMV_ROWS``).

For each shape, ``--copies`` weight copies (enough that they do not all fit in L2, as a step's 16 layers do not), one
CUDA graph of 2 x copies calls cycling through them, replayed ``--reps`` times: median microseconds per call and the
weight bytes read per second. Per row count of ``--rows`` (default 1), every configuration of
:data:`gemv_bf16.CONFIGS` for that count is checked against an fp32 reference first (max |error| over the largest
|output|; cuBLAS's own error printed next to it), against :func:`gemv_bf16.emulate` bit for bit (``exact``) and each
row against the one-row kernel's bits for that row alone (``same_as_1``). Then the linears of one decode step at that
many rows (16 layers x (q/k/v + o + gate/up + down) + LM head): cuBLAS, the default configuration and the best per
shape; last, those step sums per row count.

Usage: ``python benchmarks/gemv_bf16_bench.py --out DIR [--rows 1,2,4,8]`` (writes ``DIR/gemv_bf16.json``; a table
on stdout).
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


def parse_rows(text: str) -> list[int]:
    """``--rows``: comma-separated row counts, each 1..``gemv_bf16.MAX_ROWS``, in the order given, without repeats."""
    try:
        rows = list(dict.fromkeys(int(v) for v in text.split(",") if v.strip()))
    except ValueError:
        raise argparse.ArgumentTypeError(f"row counts must be integers, got {text!r}") from None
    if not rows or not all(1 <= r <= gemv_bf16.MAX_ROWS for r in rows):
        raise argparse.ArgumentTypeError(f"row counts must be 1..{gemv_bf16.MAX_ROWS}, got {text!r}")
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--shapes", default=",".join(SHAPES), help=f"of {', '.join(SHAPES)}")
    ap.add_argument("--rows", type=parse_rows, default=[1], help="rows of x, comma-separated (default 1)")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--l2-multiple", type=float, default=8.0, help="weight copies of at least this many L2 sizes")
    ap.add_argument("--commit", default="unknown")
    args = ap.parse_args(argv)
    unknown = [s for s in args.shapes.split(",") if s not in SHAPES]
    if unknown:
        ap.error(f"--shapes: unknown {', '.join(unknown)} (of {', '.join(SHAPES)})")
    return args


def step_table(step_us: dict[int, dict[str, float]]) -> str:
    """The linears of one decode step per row count: cuBLAS, the default configuration, the best per shape (us), and
    the default's time over the one-row default's where the row counts include 1."""
    one = step_us.get(1, {}).get("default")
    lines = ["x rows | cuBLAS us | GEMV default us | GEMV best us | default / one-row default",
             "---:|---:|---:|---:|---:"]
    for rows, st in step_us.items():
        ratio = f"{st['default'] / one:.2f}" if one else "-"
        lines.append(f"{rows} | {st['cublas']:.1f} | {st['default']:.1f} | {st['best']:.1f} | {ratio}")
    return "\n".join(lines)


def measure(name: str, rows: int, gen: torch.Generator, l2_bytes: float, reps: int) -> dict:
    """One shape at ``rows`` rows of x: cuBLAS and every configuration for that many rows (module docstring), over
    enough weight copies to fill ``l2_bytes``."""
    dev = torch.device("cuda")
    n, k = SHAPES[name]
    nbytes = n * k * 2
    copies = max(2, min(16, int(l2_bytes / nbytes) + 1))
    ws = [(torch.randn(n, k, generator=gen, device=dev) * 0.05).to(torch.bfloat16) for _ in range(copies)]
    x = torch.randn(rows, k, generator=gen, device=dev).to(torch.bfloat16)
    ref = x.float() @ ws[0].float().T
    scale = float(ref.abs().max())
    one = torch.cat([gemv_bf16.gemv(x[q:q + 1], ws[0]) for q in range(rows)])    # each row alone, one-row kernel
    row = {"shape": name, "n": n, "k": k, "x_rows": rows, "copies": copies,
           "cublas_rel_err": float((F.linear(x, ws[0]).float() - ref).abs().max()) / scale}
    row["cublas_us"] = time_calls(lambda i: F.linear(x, ws[i]), copies, reps)
    cfgs, emulated = {}, {}
    for cfg in (c for c in gemv_bf16.CONFIGS if c.rows == rows):
        y = gemv_bf16.gemv(x, ws[0], cfg)
        if cfg.unroll not in emulated:
            emulated[cfg.unroll] = gemv_bf16.emulate(x, ws[0], cfg.unroll)
        us = time_calls(lambda i, c=cfg: gemv_bf16.gemv(x, ws[i], c), copies, reps)
        cfgs[cfg.name()] = {"us": round(us, 2), "rel_err": float((y.float() - ref).abs().max()) / scale,
                            "exact": bool(torch.equal(y, emulated[cfg.unroll])), "same_as_1": bool(torch.equal(y, one))}
    row["configs"] = cfgs
    default = gemv_bf16.choose(n, k, rows).name()
    best = min(cfgs, key=lambda c: cfgs[c]["us"])
    row.update(default=default, default_us=cfgs[default]["us"], best=best, best_us=cfgs[best]["us"])
    print(f"{rows} x {name} {n}x{k} ({copies} copies): cuBLAS {row['cublas_us']:.2f} us "
          f"({nbytes / row['cublas_us'] / 1e6:.2f} TB/s, err {row['cublas_rel_err']:.1e}); default {default} "
          f"{row['default_us']:.2f} us ({nbytes / row['default_us'] / 1e6:.2f} TB/s); best {best} {row['best_us']:.2f} "
          f"us (err {cfgs[best]['rel_err']:.1e}); exact {sum(c['exact'] for c in cfgs.values())}/{len(cfgs)}, same as "
          f"one row {sum(c['same_as_1'] for c in cfgs.values())}/{len(cfgs)}", flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("gemv_bf16_bench: needs a CUDA GPU", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    l2 = getattr(props, "L2_cache_size", 50 * 2**20)
    err = gemv_bf16.check(dev, max(args.rows))
    print(f"card {props.name}, L2 {l2 / 2**20:.0f} MiB, check: {err or 'ok'}", flush=True)
    if err:
        return 1
    gen = torch.Generator(device=dev).manual_seed(0)
    by_rows: dict[int, dict] = {}
    for rows in args.rows:
        shapes = [measure(name, rows, gen, args.l2_multiple * l2, args.reps) for name in args.shapes.split(",")]
        step = {key: sum(PER_STEP[r["shape"]] * r[f"{key}_us"] for r in shapes)
                for key in ("cublas", "default", "best")}
        by_rows[rows] = {"rows": shapes, "step_us": step}
        print(f"linears of a {rows}-row step (16 layers + LM head), us: cuBLAS {step['cublas']:.1f}, GEMV default "
              f"{step['default']:.1f}, GEMV best per shape {step['best']:.1f}", flush=True)
    print(step_table({r: v["step_us"] for r, v in by_rows.items()}))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    first = by_rows[args.rows[0]]
    (out / "gemv_bf16.json").write_text(json.dumps({
        "card": props.name, "torch": torch.__version__, "commit": args.commit, "command": " ".join(sys.argv),
        "rows": first["rows"], "step_us": first["step_us"],      # the first row count's, as before --rows
        "by_x_rows": {str(r): v for r, v in by_rows.items()}}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
