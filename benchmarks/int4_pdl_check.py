"""Does launching the INT4 Triton GEMM as a programmatic dependent (``MODEL_SERVER_INT4_TRITON_PDL=1``) change its
output? A GPU check (issue 17), no timing.

The kernel's code is the same with and without PDL apart from ``griddepcontrol.wait`` at its start and
``griddepcontrol.launch_dependents`` after its main loop, and its sums run in a fixed order, so with the same inputs
and configuration both must give the same bits. For each shape of llama-3.2-1b at --ms rows and each configuration
(the served one and split-K variants, some with more programs than the SMs hold at once), this runs the product with
PDL off, then on: ``--reps`` times eagerly with freed GPU memory filled with NaN first (a read of a partial sum before
it is written shows up as NaN or as a different result), and once as four back-to-back launches captured in a CUDA
graph. Reports, per case: bits equal to the PDL-off result, NaNs, relative error against float32.

  python3 benchmarks/int4_pdl_check.py --out DIR        # exits 2 with one line when there is no CUDA device
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model_server import int4_triton, int4_triton_config  # noqa: E402
from model_server.int4_quant import dequantize_groupwise, quantize_groupwise  # noqa: E402

SHAPES = {"qkv_proj": (3072, 2048), "gate_up_proj": (16384, 2048), "down_proj": (2048, 8192),
          "lm_head": (128256, 2048)}
SPLITS = (1, 2, 8, 16)


def bit_check_device(script: str, device: str) -> tuple[torch.device, torch.dtype] | None:
    """The device and activation dtype a bit check (this one, int4_glu_check.py, int4_paired_check.py) runs on: bf16
    on ``cuda``, fp16 on ``cpu`` (Triton's interpreter cannot bit-cast to bf16). None, after printing the one line
    the script exits 2 with, for ``cuda`` without a CUDA device or ``cpu`` without ``TRITON_INTERPRET=1``."""
    err = None
    if device == "cuda" and not torch.cuda.is_available():
        err = f"{script}: no CUDA device"
    elif device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        err = f"{script}: --device cpu needs TRITON_INTERPRET=1 (Triton's interpreter)"
    if err:
        print(err, file=sys.stderr)
        return None
    return torch.device(device), torch.bfloat16 if device == "cuda" else torch.float16


def result_stamp(dev: torch.device, group: int) -> dict:
    """What a bit check's JSON starts with: the device, torch, Triton, the group size and the commit under test."""
    return {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (interpreter)",
            "torch": torch.__version__, "triton": int4_triton.triton.__version__, "group": group,
            "commit": os.environ.get("EDGE_EVAL_COMMIT", "unknown")}


def set_pdl(on: bool) -> None:
    os.environ[int4_triton_config.PDL_SWITCH] = "1" if on else "0"
    int4_triton_config.pdl_on.cache_clear()


def poison() -> None:
    """Fill the caching allocator's free memory with NaN (allocate, fill, free), so stale reads show."""
    free = torch.cuda.mem_get_info()[0]
    junk = torch.full((min(free // 2, 2 << 30) // 4,), float("nan"), device="cuda")
    del junk


def repeat(product, x: torch.Tensor, reps: int) -> list[torch.Tensor]:
    """``product(x)`` ``reps`` times eagerly (freed memory poisoned before each), then ``product`` of ``x * (1 + i /
    8)``, i < 4, as four launches captured in one CUDA graph and replayed after poisoning (also used by
    int4_repeat_check.py)."""
    outs = []
    for _ in range(reps):
        poison()
        outs.append(product(x).clone())
    xs = [x * (1 + i / 8) for i in range(4)]
    graph = torch.cuda.CUDAGraph()
    product(xs[0])                                                     # compiled before the capture
    with torch.cuda.graph(graph):
        ys = [product(xi) for xi in xs]
    poison()
    graph.replay()
    torch.cuda.synchronize()
    return outs + [y.clone() for y in ys]


def run_case(x: torch.Tensor, ts: tuple, group: int, cfg, reps: int, reduce: str | None) -> list[torch.Tensor]:
    """:func:`repeat` of the Triton GEMM with ``cfg`` and ``reduce``."""
    return repeat(lambda xi: int4_triton.int4_triton_mm(xi, *ts, group, cfg, reduce), x, reps)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--ms", default="32,64", help="rows (comma-separated)")
    ap.add_argument("--reps", type=int, default=8)
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated names of SHAPES")
    ap.add_argument("--splits", default=",".join(map(str, SPLITS)), help="split K values besides the served one")
    ap.add_argument("--reduce", choices=("auto", "ticket", "kernel"), default="auto", help="split-K reduction")
    ap.add_argument("--stages", type=int, default=0, help="pipeline stages (0: the served configuration's)")
    ap.add_argument("--pdl", default="0,1", help="PDL settings to run (the first is the baseline of same_bits)")
    args = ap.parse_args(argv)
    if bit_check_device("int4_pdl_check", "cuda") is None:
        return 2
    if not int4_triton.available():
        print("int4_pdl_check: Triton is not installed", file=sys.stderr)
        return 2
    ms = [int(m) for m in args.ms.split(",") if m]
    sms = int4_triton._num_sms(torch.device("cuda"))
    rows = []
    arms = [a == "1" for a in args.pdl.split(",")]
    for name in args.shapes.split(","):
        n, k = SHAPES[name]
        torch.manual_seed(n)
        q, sz = quantize_groupwise(torch.randn(n, k, device="cuda") * 0.02, args.group)
        ts = (int4_triton.pack_int4(q, args.group), *int4_triton.split_scales_and_zeros(sz.to(torch.bfloat16)))
        w = dequantize_groupwise(q, sz.to(torch.bfloat16), args.group)
        iters = k // int4_triton.block_k(args.group)
        for m in ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            xs = [x * (1 + i / 8) for i in range(4)]
            refs = [xi.float() @ w.t() for xi in [x] * args.reps + xs]
            base = int4_triton.choose_config(m, n, k, int4_triton.block_k(args.group), sms)
            for split in sorted({base.split_k, *(int(v) for v in args.splits.split(","))}):
                if iters % split or iters // split < 2:
                    continue
                cfg = dataclasses.replace(base, split_k=split, num_stages=args.stages or base.num_stages)
                got = {}
                try:
                    for on in arms:
                        set_pdl(on)
                        got[on] = run_case(x, ts, args.group, cfg, args.reps, args.reduce)
                except Exception as e:                # noqa: BLE001 - record it, go on with the other cases
                    rows.append({"shape": name, "m": m, "split_k": split, "same_bits": False, "error": f"{e!r}"[:300]})
                    print(json.dumps(rows[-1]), flush=True)
                    continue
                tiles = -(-n // cfg.block_n) * -(-m // cfg.block_m) * split
                first = got[arms[0]]
                errs = {str(on): [float((y.float() - r).norm() / r.norm()) for y, r in zip(got[on], refs)]
                        for on in got}
                row = {"shape": name, "n": n, "k": k, "m": m, "split_k": split, "served": split == base.split_k,
                       "stages": cfg.num_stages, "reduce": args.reduce, "programs": tiles,
                       "same_bits": all(torch.equal(a, b) for on in got for a, b in zip(first, got[on])),
                       "eager_same": all(torch.equal(first[0], y) for y in first[:args.reps]),
                       "nans": {str(on): int(sum(int(torch.isnan(y).sum()) for y in got[on])) for on in got},
                       "max_rel_err": {on: max(e) for on, e in errs.items()},
                       "max_rel_err_eager": {on: max(e[:args.reps]) for on, e in errs.items()},
                       "max_rel_err_graph": {on: max(e[args.reps:]) for on, e in errs.items()}}
                rows.append(row)
                print(json.dumps(row), flush=True)
    set_pdl(False)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "triton": int4_triton.triton.__version__,
           "rows": rows, "all_same_bits": all(r["same_bits"] for r in rows)}
    (out / "int4_pdl_check.json").write_text(json.dumps(res, indent=1))
    print(f"PDL arms {args.pdl}: {sum(r['same_bits'] for r in rows)}/{len(rows)} cases bit-identical across arms, "
          f"{sum(bool(r.get('eager_same')) for r in rows)}/{len(rows)} across eager repetitions")
    return 0


if __name__ == "__main__":
    sys.exit(main())
