"""The INT4 GEMM's GLU epilogue on a GPU (issue 17): its bits against the GEMM followed by the SiLU-mul, and its time.

``MODEL_SERVER_INT4_GLU_EPILOGUE=1`` (:mod:`model_server.int4_triton_glu`) has a merged gate/up projection store
``silu(gate) * up`` from the Triton GEMM instead of both products for a separate SiLU-mul kernel. For llama-3.2-1b's
merged gate/up (16,384 x 2,048, group 128) at each row count where the served configuration splits no K: the epilogue
against the GEMM followed by the fast engine's compiled ``silu_mul`` (what the engine runs without the switch) and
the eager one (elements that differ, the largest difference in units of the last place), whether it repeats its
bits (:func:`benchmarks.int4_pdl_check.repeat`: eager repetitions on poisoned memory and a CUDA-graph replay), and
the time of each path (:func:`benchmarks.gemv_probe.graph_us`: a CUDA graph of 50 launches, median of ``--reps``
replays, microseconds per launch).

  python3 benchmarks/int4_glu_check.py --out DIR      # exits 2 with one line when there is no CUDA device
  TRITON_INTERPRET=1 python3 benchmarks/int4_glu_check.py --out DIR --device cpu --shape 2048,256 --ms 24,40
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
from benchmarks.int4_pdl_check import SHAPES, bit_check_device, repeat, result_stamp  # noqa: E402
from model_server import int4_triton, int4_triton_glu  # noqa: E402
from model_server.engines.fast import fused  # noqa: E402
from model_server.int4_quant import quantize_groupwise  # noqa: E402


def ulps(got: torch.Tensor, want: torch.Tensor) -> float:
    """The largest difference in units of ``eps * |reference|`` (the reference's dtype: one to two units in its last
    place)."""
    unit = torch.finfo(want.dtype).eps * want.float().abs().clamp_min(2.0 ** -126)
    return float(((got.float() - want.float()).abs() / unit).max())


def check(m: int, ts: tuple, inter: int, group: int, ops: fused.Ops, reps: int) -> dict:
    """One row count: bits against the separate ops; on a GPU also repeatability and times (not in the interpreter)."""
    dev = ts[0].device
    x = torch.randn(m, ts[0].shape[1] * 2, device=dev, dtype=torch.bfloat16 if dev.type == "cuda" else torch.float16)

    def separate(xi: torch.Tensor, silu_mul) -> torch.Tensor:
        y = int4_triton.int4_triton_mm(xi, *ts, group)
        return silu_mul(y[:, :inter], y[:, inter:])

    got = int4_triton_glu.int4_triton_glu(x, *ts, group)
    row: dict = {"m": m, "config": str(int4_triton.choose_config(m, 2 * inter, x.shape[1], int4_triton.block_k(group),
                                                               int4_triton._num_sms(x.device)))}
    if got is None:
        row["epilogue"] = "none (split K)"
        return row
    for name, fn in (("compiled", ops.silu_mul), ("eager", fused.silu_mul)):
        want = separate(x, fn)
        row[f"differ_vs_{name}"] = int((got != want).sum())
        row[f"max_ulps_vs_{name}"] = ulps(got, want)
    if dev.type != "cuda":
        return row
    outs = repeat(lambda xi: int4_triton_glu.int4_triton_glu(xi, *ts, group), x, 4)
    row["repeats_bits"] = all(torch.equal(outs[0], y) for y in outs[:4])
    row["nans"] = int(sum(int(torch.isnan(y).sum()) for y in outs))
    row["us_separate"] = graph_us(lambda: separate(x, ops.silu_mul), reps=reps)
    row["us_epilogue"] = graph_us(lambda: int4_triton_glu.int4_triton_glu(x, *ts, group), reps=reps)
    row["us_gemm_only"] = graph_us(lambda: int4_triton.int4_triton_mm(x, *ts, group), reps=reps)
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--ms", default="33,48,64,128,256", help="rows (comma-separated)")
    ap.add_argument("--reps", type=int, default=50, help="graph replays per timing")
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--shape", default="%d,%d" % SHAPES["gate_up_proj"], help="N,K of the merged gate/up weight")
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                    help="cpu: a dry run of the bit checks in Triton's interpreter (TRITON_INTERPRET=1, fp16, "
                         "no timing)")
    args = ap.parse_args(argv)
    try:
        ms = [int(m) for m in args.ms.split(",") if m]
        n, k = (int(v) for v in args.shape.split(","))
    except ValueError:
        print(f"int4_glu_check: --ms and --shape must be comma-separated integers, got {args.ms!r} and "
              f"{args.shape!r}", file=sys.stderr)
        return 2
    if (got := bit_check_device("int4_glu_check", args.device)) is None:
        return 2
    dev, dtype = got
    torch.manual_seed(n)
    q, sz = quantize_groupwise(torch.randn(n, k, device=dev) * 0.02, args.group)
    ts = (int4_triton.pack_int4(q, args.group), *int4_triton.split_scales_and_zeros(sz.to(dtype)))
    ops = fused.Ops(dev.type == "cuda", dev, dtype)
    rows = []
    for m in ms:
        rows.append(check(m, ts, n // 2, args.group, ops, args.reps))
        print(json.dumps(rows[-1]), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res = {**result_stamp(dev, args.group), "ops_fused": ops.fused, "shape": [n, k], "rows": rows}
    (out / "int4_glu_check.json").write_text(json.dumps(res, indent=1))
    ran = [r for r in rows if "differ_vs_compiled" in r]
    print("; ".join(f"{r['m']} rows: " + (f"{r['us_separate']:.1f} -> {r['us_epilogue']:.1f} us, " if "us_epilogue" in r
                                          else "") + f"{r['differ_vs_compiled']} differ" for r in ran)
          or "no row ran the epilogue")
    return 0


if __name__ == "__main__":
    sys.exit(main())
