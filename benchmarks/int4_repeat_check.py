"""Do the small-rows INT4 kernels give the same bits from run to run? A GPU check (issue 17), no timing.

``benchmarks/int4_pdl_check.py`` checks the Triton GEMM (33-64+ rows); this one checks what serves fewer rows: the
CUDA mma kernel (:mod:`model_server.int4_mma`, ``auto``'s kernel up to 16 rows, 32 on wide layers, with its own
split-K tickets) and the small-rows Triton kernel (:mod:`model_server.int4_gemv`, ``MODEL_SERVER_INT4_KERNELS=triton``
up to 16 rows). Their sums run in a fixed order, so the same inputs must give the same bits. For each shape of
llama-3.2-1b, kernel and row count, with the configuration each would serve: ``--reps`` eager products with the
caching allocator's free memory filled with NaN first (a partial sum read before it is written shows up as NaN or
as other bits), then four back-to-back launches captured in one CUDA graph, replayed after the same poisoning.
Reports per case: eager repetitions bit-identical, NaNs, the largest relative error against float32.

  python3 benchmarks/int4_repeat_check.py --out DIR    # exits 2 with one line when there is no CUDA device
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.int4_pdl_check import SHAPES, repeat  # noqa: E402
from model_server import int4_gemv, int4_mma, int4_triton  # noqa: E402
from model_server.int4_quant import dequantize_groupwise, quantize_groupwise  # noqa: E402

KERNELS = ("mma", "gemv")


def layouts(q: torch.Tensor, sz: torch.Tensor, group: int) -> dict[str, tuple]:
    """Each kernel's layout of the same 4-bit values."""
    return {"mma": int4_mma.pack(q, sz, group),
            "gemv": (int4_triton.pack_int4(q, group), *int4_triton.split_scales_and_zeros(sz.to(torch.bfloat16)))}


def product(kernel: str, x: torch.Tensor, ts: tuple, group: int) -> torch.Tensor:
    if kernel == "mma":
        return int4_mma.int4_mma_mm(x, *ts, group)
    return int4_gemv.int4_gemv_mm(x, *ts, group)


def check(kernel: str, name: str, m: int, ts: tuple, w: torch.Tensor, group: int, reps: int) -> dict:
    n, k = w.shape
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    refs = [xi.float() @ w.t() for xi in [x] * reps + [x * (1 + i / 8) for i in range(4)]]
    row: dict = {"kernel": kernel, "shape": name, "n": n, "k": k, "m": m}
    if kernel == "mma":
        row["config"] = int4_mma.choose_config(m, n, k, int4_mma._num_sms(x.device)).name()
    try:
        got = repeat(lambda xi: product(kernel, xi, ts, group), x, reps)
    except Exception as e:                                             # noqa: BLE001 - record it, go on
        row.update(eager_same=False, error=f"{e!r}"[:300])
        return row
    errs = [float((y.float() - r).norm() / r.norm()) for y, r in zip(got, refs)]
    row.update(eager_same=all(torch.equal(got[0], y) for y in got[:reps]),
               nans=int(sum(int(torch.isnan(y).sum()) for y in got)),
               max_rel_err_eager=max(errs[:reps]), max_rel_err_graph=max(errs[reps:]))
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--kernels", default=",".join(KERNELS), help=f"comma-separated, of {', '.join(KERNELS)}")
    ap.add_argument("--ms", default="1,2,8,16,32", help="rows (comma-separated; the gemv kernel takes <= 16)")
    ap.add_argument("--reps", type=int, default=8)
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated names of SHAPES")
    args = ap.parse_args(argv)
    kernels = [kn for kn in args.kernels.split(",") if kn]
    if bad := [kn for kn in kernels if kn not in KERNELS]:
        print(f"int4_repeat_check: unknown kernel {bad[0]!r} (of {', '.join(KERNELS)})", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("int4_repeat_check: no CUDA device", file=sys.stderr)
        return 2
    if "mma" in kernels and not int4_mma.usable("cuda"):
        print(f"int4_repeat_check: the mma kernel cannot run here: {int4_mma.why_not('cuda')}", file=sys.stderr)
        return 2
    ms = [int(m) for m in args.ms.split(",") if m]
    rows = []
    for name in args.shapes.split(","):
        n, k = SHAPES[name]
        torch.manual_seed(n)
        q, sz = quantize_groupwise(torch.randn(n, k, device="cuda") * 0.02, args.group)
        w = dequantize_groupwise(q, sz.to(torch.bfloat16), args.group)
        packed = layouts(q, sz, args.group)
        if "mma" in kernels:
            int4_mma.reserve("cuda", n, k, max(ms))
        for kernel in kernels:
            for m in ms:
                if kernel == "gemv" and m > int4_gemv_max_rows():
                    continue
                rows.append(check(kernel, name, m, packed[kernel], w, args.group, args.reps))
                print(json.dumps(rows[-1]), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "rows": rows,
           "all_same": all(r.get("eager_same") for r in rows)}
    (out / "int4_repeat_check.json").write_text(json.dumps(res, indent=1))
    print(f"{sum(bool(r.get('eager_same')) for r in rows)}/{len(rows)} cases bit-identical across eager repetitions, "
          f"{sum(r.get('nans', 0) for r in rows)} NaNs, {sum('error' in r for r in rows)} errors")
    return 0


def int4_gemv_max_rows() -> int:
    from model_server.int4_choice import GEMV_MAX_ROWS
    return GEMV_MAX_ROWS


if __name__ == "__main__":
    sys.exit(main())
