"""The INT4 Triton GEMM reading each group's (scale, zero) as one 32-bit word, against separate 16-bit scales and zeros
(issue 17): the same bits, and the time per linear with the weights hot in L2 and cold.

``MODEL_SERVER_INT4_TRITON_PAIRED_SCALES=1`` (:func:`model_server.int4_triton_config.paired_scales_on`) has a layer
hold :func:`model_server.int4_triton_layout.pair_scales_and_zeros`'s words for the GEMM: compiled for sm_90, the
separate scales and zeros are four plain global loads per K-block of the main loop, the words ride the software
pipeline's asynchronous copies. For each of llama-3.2-1b's merged linears (``--shapes``) and row count (``--ms``),
with the served configuration (:func:`model_server.int4_triton.choose_config`; the merged gate/up also with its GLU
epilogue where that configuration splits no K): elements that differ (must be 0), then on a GPU the microseconds per
launch of each way, **hot** (:func:`benchmarks.gemv_probe.graph_us`: one weight, a CUDA graph of 50 launches) and
**cold** (a graph that cycles through ``--copies`` weights of the shape, at least ``--cold-mb`` MB together, so each
launch reads from memory as a decode step does; microseconds per launch). The linears of one decode step of that many
rows are summed (16 layers' q/k/v, o, gate/up (GLU where served) and down, and the LM head).

  python3 benchmarks/int4_paired_check.py --out DIR           # exits 2 with one line when there is no CUDA device
  TRITON_INTERPRET=1 python3 benchmarks/int4_paired_check.py --out DIR --device cpu --shapes 256,128 --ms 24,70
                                                              # a dry run of the bit checks on CPU (fp16, no timing)
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.gemv_probe import graph_us  # noqa: E402
from benchmarks.int4_pdl_check import bit_check_device, result_stamp  # noqa: E402
from model_server import int4_triton, int4_triton_glu  # noqa: E402
from model_server.int4_quant import quantize_groupwise  # noqa: E402

SHAPES = {"qkv_proj": (3072, 2048), "o_proj": (2048, 2048), "gate_up_proj": (16384, 2048), "down_proj": (2048, 8192),
          "lm_head": (128256, 2048)}
PER_STEP = {"qkv_proj": 16, "o_proj": 16, "gate_up_proj": 16, "down_proj": 16, "lm_head": 1}


def weights(n: int, k: int, group: int, dtype: torch.dtype, dev: torch.device, copies: int) -> list[tuple]:
    """``copies`` quantized weights of ``[n, k]``: (packed, scales, zeros, words) each."""
    out = []
    for i in range(copies):
        torch.manual_seed(n + 7 * i)
        q, sz = quantize_groupwise(torch.randn(n, k, device=dev) * 0.02, group)
        sz = sz.to(dtype)
        out.append((int4_triton.pack_int4(q, group), *int4_triton.split_scales_and_zeros(sz),
                    int4_triton.pair_scales_and_zeros(sz)))
    return out


def ways(glu: bool, group: int):
    """``{way: fn(x, packed, scales, zeros, words)}`` for the plain GEMM or its GLU epilogue."""
    op = int4_triton_glu.int4_triton_glu if glu else int4_triton.int4_triton_mm
    return {"split": lambda x, p, s, z, w: op(x, p, s, z, group),
            "paired": lambda x, p, s, z, w: op(x, p, w, z, group)}


def check(name: str, m: int, ws: list[tuple], group: int, glu: bool, reps: int) -> dict | None:
    """One shape, row count and path: bits of both ways; on a GPU their hot and cold times."""
    packed = ws[0][0]
    dev, k = packed.device, packed.shape[1] * 2
    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16 if dev.type == "cuda" else torch.float16)
    fns = ways(glu, group)
    outs = {way: fn(x, *ws[0]) for way, fn in fns.items()}
    if outs["split"] is None:                                   # no GLU epilogue where the config splits K
        return None
    row: dict = {"shape": name + ("+glu" if glu else ""), "m": m,
                 "config": str(int4_triton.choose_config(m, packed.shape[0], k, int4_triton.block_k(group),
                                                         int4_triton._num_sms(dev))),
                 "differ": int((outs["split"] != outs["paired"]).sum())}
    if dev.type != "cuda":
        return row
    for way, fn in fns.items():
        row[f"us_hot_{way}"] = graph_us(lambda fn=fn: fn(x, *ws[0]), reps=reps)
        row[f"us_cold_{way}"] = round(graph_us(lambda fn=fn: [fn(x, *w) for w in ws], calls=4, reps=reps) / len(ws), 2)
    return row


def step_sums(rows: list[dict]) -> dict:
    """Per row count and way: the linears of one decode step (:data:`PER_STEP`; the GLU path for gate/up where it ran),
    cold and hot, microseconds."""
    out: dict = {}
    for m in sorted({r["m"] for r in rows}):
        at = {r["shape"]: r for r in rows if r["m"] == m and "us_hot_split" in r}
        gate_up = at.get("gate_up_proj+glu") or at.get("gate_up_proj")
        parts = [(at.get(s), PER_STEP[s]) for s in ("qkv_proj", "o_proj", "down_proj", "lm_head")] + [(gate_up, 16)]
        if any(r is None for r, _ in parts):
            continue
        out[m] = {f"{heat}_{way}": round(sum(r[f"us_{heat}_{way}"] * n for r, n in parts), 1)
                  for heat in ("cold", "hot") for way in ("split", "paired")}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--ms", default="16,32,64,256", help="rows (comma-separated)")
    ap.add_argument("--shapes", default=",".join(SHAPES),
                    help="names of the 1B preset's linears, or one N,K (comma-separated)")
    ap.add_argument("--reps", type=int, default=20, help="graph replays per timing")
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--cold-mb", type=float, default=160.0, help="weights the cold timing cycles through (MB, > L2)")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                    help="cpu: a dry run of the bit checks in Triton's interpreter (TRITON_INTERPRET=1, fp16, "
                         "no timing)")
    args = ap.parse_args(argv)
    try:
        ms = [int(m) for m in args.ms.split(",") if m]
        if all(s in SHAPES for s in args.shapes.split(",")):
            shapes = {s: SHAPES[s] for s in args.shapes.split(",")}
        else:
            n, k = (int(v) for v in args.shapes.split(","))
            shapes = {f"{n}x{k}": (n, k)}
    except ValueError:
        print(f"int4_paired_check: --ms must be integers and --shapes names of {', '.join(SHAPES)} or one N,K; got "
              f"{args.ms!r} and {args.shapes!r}", file=sys.stderr)
        return 2
    if (got := bit_check_device("int4_paired_check", args.device)) is None:
        return 2
    dev, dtype = got
    rows = []
    for name, (n, k) in shapes.items():
        mb = n * k / 2 / 1e6 * (1 + 8 / args.group)
        copies = max(1, int(args.cold_mb / mb) + 1) if dev.type == "cuda" else 1
        ws = weights(n, k, args.group, dtype, dev, copies)
        for m in ms:
            for glu in (False, True) if name.startswith("gate_up") or dev.type == "cpu" else (False,):
                row = check(name, m, ws, args.group, glu, args.reps)
                if row is not None:
                    row["copies"] = copies
                    rows.append(row)
                    print(json.dumps(row), flush=True)
        del ws
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res = {**result_stamp(dev, args.group), "rows": rows, "step_us": step_sums(rows)}
    (out / "int4_paired_check.json").write_text(json.dumps(res, indent=1))
    for m, s in res["step_us"].items():
        print(f"{m} rows, linears per step (us): cold split {s['cold_split']} -> paired {s['cold_paired']}; "
              f"hot split {s['hot_split']} -> paired {s['hot_paired']}")
    bad = [r for r in rows if r["differ"]]
    print(f"{len(rows) - len(bad)} of {len(rows)} cases give the same bits both ways")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
