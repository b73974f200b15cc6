"""GPU micro-benchmark of the CUDA W4A16 kernel (model_server/int4_mma.py) against bf16 cuBLAS and today's INT4 kernels.

Per linear of the llama-3.2-1b preset (merged q/k/v and gate/up, and the LM head) and per row count M: bf16 ``x @ W.T``
(cuBLAS), tinygemm (``aten._weight_int4pack_mm``), the Triton GEMM (``int4_triton``, default config), and the mma
kernel at the config it serves (``mma``: ``int4_mma.choose_config``, the measured table's where it has the shape), at
the rule's config as served before that table (``mma_rule``), its FLAT variant (``mma_flat``: activation copies
unrolled; the rule's config for shapes the table lacks) and its KW variant (``mma_kw``: the same rows per CTA with 2
or 4 warps along K sharing each tile; both in the .cu's header), plus a sweep of its configs (tiles per warp, warps, stages, split K; each also FLAT;
warps along K), each checked against a float32 reference first. Timing as in benchmarks/int4_kernels.py: calls captured back to back in a CUDA
graph, rotating over weight copies that cover --l2-multiple x L2 (weights come from HBM), median of --reps replays.
Per step (16 layers x 4 linears + the LM head): bf16, ``dispatch`` (what ``MODEL_SERVER_INT4_KERNELS=auto`` runs
today: tinygemm up to int4.tinygemm_max_rows, the Triton GEMM above), mma at its served and rule configs, mma with the best
config per shape, and the best INT4 method per shape. Writes int4_mma.json / .md to --out.

  python3 benchmarks/int4_mma_bench.py --out DIR      # exits 2 with one line when there is no CUDA device
  python3 benchmarks/int4_mma_bench.py --shapes lm_head --ms 1,8 --out DIR   # one layer's sweep (for int4_mma_tune.py)
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from int4_kernels import LM_HEAD, MERGED, N_LAYERS, rel_err, report, time_calls  # noqa: E402
from int4_mma_configs import kw_twin, sweep_configs  # noqa: E402
from model_server import int4_mma, int4_triton  # noqa: E402
from model_server.int4 import INNER_K_TILES, tinygemm_max_rows  # noqa: E402
from model_server.int4_quant import dequantize_groupwise, quantize_groupwise  # noqa: E402

MAX_ERR = 1e-2
SHAPES = dict(MERGED, lm_head=LM_HEAD)       # name -> (N out, K in)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    head, rest = __doc__.split("\n\n", 1)
    p = argparse.ArgumentParser(description=head, formatter_class=argparse.RawDescriptionHelpFormatter, epilog=rest)
    p.add_argument("--out", type=Path, default=None, help="directory for int4_mma.json / .md")
    p.add_argument("--ms", default="1,8,16,32,64", help="rows M, 1..64 (comma-separated)")
    p.add_argument("--group", type=int, default=128, choices=(64, 128, 256))
    p.add_argument("--reps", type=int, default=30, help="timed graph replays per cell (>= 1)")
    p.add_argument("--l2-multiple", type=float, default=4.0, help="weight copies per method cover this x L2")
    p.add_argument("--sweep-budget-s", type=float, default=240.0,
                   help="sweep for about this long in all, each cell an even share of what is left (the LM head too)")
    p.add_argument("--no-sweep", action="store_true", help="time the default config only")
    p.add_argument("--shapes", default=",".join(SHAPES),
                   help=f"layers to run, comma-separated, of {', '.join(SHAPES)} (default: all five; with fewer, the "
                        "per-step totals add up only those)")
    p.add_argument("--once", action="store_true",
                   help="run the kernel twice per shape and M at the rule's config, the served (measured table's) config, "
                        "the rule's KW twin and twice the rule's split K, nothing else (for a profiler: ncu -k regex:w4a16_mma; gpu_calls.sh mmaprof)")
    p.add_argument("--smoke", action="store_true",
                   help="only check the kernel against the reference on small shapes at many row counts and configs "
                        "(split K, tiles per warp, warps, stages), print one line per case, exit 1 on any failure")
    args = p.parse_args(argv)
    args.ms = [int(v) for v in args.ms.split(",") if v.strip()]
    args.shapes = [v.strip() for v in args.shapes.split(",") if v.strip()]
    if not args.shapes or any(v not in SHAPES for v in args.shapes):
        p.error(f"--shapes takes names of {', '.join(SHAPES)}")
    if not args.ms or min(args.ms) < 1 or max(args.ms) > int4_mma.MAX_ROWS or args.reps < 1:
        p.error(f"--ms needs integers in 1..{int4_mma.MAX_ROWS} and --reps >= 1")
    return args


class Layer:
    """One weight [N, K] in every method's format, with copies for rotation."""

    def __init__(self, n: int, k: int, group: int, l2_bytes: int, l2_multiple: float) -> None:
        self.n, self.k, self.group = n, k, group
        w = torch.randn(n, k, device="cuda") * 0.02
        self.q, sz32 = quantize_groupwise(w, group)
        self.sz = sz32.to(torch.bfloat16)
        wb = w.to(torch.bfloat16)
        del w, sz32
        plain = (self.q[:, ::2] << 4 | self.q[:, 1::2]).to(torch.uint8).contiguous()
        base = {"bf16": (wb,),
                "tinygemm": (torch.ops.aten._convert_weight_to_int4pack(plain, INNER_K_TILES), self.sz),
                "triton": (int4_triton.pack_int4(self.q, group), *int4_triton.split_scales_and_zeros(self.sz)),
                "mma": int4_mma.pack(self.q, self.sz, group)}
        self.copies: dict[str, list[tuple[torch.Tensor, ...]]] = {}
        for meth, ts in base.items():
            nbytes = sum(t.numel() * t.element_size() for t in ts)
            c = min(256, max(1, math.ceil(l2_multiple * l2_bytes / nbytes)))
            self.copies[meth] = [ts] + [tuple(t.clone() for t in ts) for _ in range(c - 1)]

    def call(self, meth: str, x: torch.Tensor, ts: tuple[torch.Tensor, ...], cfg=None):
        if meth == "bf16":
            return lambda: x @ ts[0].t()
        if meth == "tinygemm":
            return lambda: torch.ops.aten._weight_int4pack_mm(x, ts[0], self.group, ts[1])
        if meth == "triton":
            return lambda: int4_triton.int4_triton_mm(x, ts[0], ts[1], ts[2], self.group)
        return lambda: int4_mma.int4_mma_mm(x, ts[0], ts[1], self.group, cfg)

    def calls(self, meth: str, x: torch.Tensor, cfg=None) -> list:
        return [self.call(meth, x, ts, cfg) for ts in self.copies[meth]]

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        return x.float() @ dequantize_groupwise(self.q, self.sz, self.group).t()


def run(args: argparse.Namespace) -> dict:
    props = torch.cuda.get_device_properties(0)
    sms, l2 = props.multi_processor_count, int(getattr(props, "L2_cache_size", 50 << 20))
    shapes = {name: SHAPES[name] for name in args.shapes}
    cells: list[dict] = []
    t0 = time.time()
    deadline = t0 + args.sweep_budget_s
    cells_left = len(shapes) * len(args.ms)
    for name, (n, k) in shapes.items():
        lay = Layer(n, k, args.group, l2, args.l2_multiple)
        int4_mma.reserve(torch.device("cuda"), n, k)
        for m in args.ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = lay.reference(x)
            cell: dict = {"name": name, "n": n, "k": k, "m": m, "us": {}, "err": {}, "sweep": []}
            base = int4_mma.rule_config(m, n, k, sms)
            twins = {"mma_rule": base, "mma_flat": dataclasses.replace(base, flat=1), "mma_kw": kw_twin(base)}
            for meth in ("bf16", "tinygemm", "triton", "mma", "mma_rule", "mma_flat", "mma_kw"):
                kind, cfg = ("mma", twins[meth]) if meth in twins else (meth, None)
                try:
                    if meth in twins:
                        int4_mma.reserve_config(torch.device("cuda"), cfg, m, n)
                    if meth != "bf16":
                        cell["err"][meth] = rel_err(lay.call(kind, x, lay.copies[kind][0], cfg)(), ref)
                    cell["us"][meth] = time_calls(lay.calls(kind, x, cfg), args.reps, False)[1]
                except Exception as e:                      # noqa: BLE001 - keep the other methods' numbers
                    cell["err"][meth] = f"error: {e!r}"[:300]
            cell["mma_config"] = vars(int4_mma.choose_config(m, n, k, sms))
            now = time.time()                               # an even share of what is left: the last cells get theirs
            cell_deadline = now + max(0.0, deadline - now) / cells_left
            cells_left -= 1
            for cfg in ([] if args.no_sweep else sweep_configs(m, n, k, sms)[3:]):     # default and twins: above
                if time.time() > cell_deadline:
                    cell["sweep_cut"] = True
                    break
                row: dict = {"config": vars(cfg)}
                try:
                    int4_mma.reserve_config(torch.device("cuda"), cfg, m, n)
                    row["err"] = rel_err(lay.call("mma", x, lay.copies["mma"][0], cfg)(), ref)
                    if row["err"] < MAX_ERR:
                        row["us"] = time_calls(lay.calls("mma", x, cfg), max(5, args.reps // 3), False)[1]
                except Exception as e:                      # noqa: BLE001
                    row["error"] = f"{e!r}"[:300]
                cell["sweep"].append(row)
            timed = [r for r in cell["sweep"] if "us" in r]
            if timed:
                cell["mma_best"] = min(timed, key=lambda r: r["us"])
            cells.append(cell)
            us = cell["us"]
            print(f"[{time.time() - t0:6.1f}s] {name} {n}x{k} M={m}: "
                  + " ".join(f"{k2}={v:.1f}us" for k2, v in us.items())
                  + (f" mma_best={cell['mma_best']['us']:.1f}us {cell['mma_best']['config']}" if timed else "")
                  + " err " + " ".join(f"{k2}={v:.1e}" if isinstance(v, float) else f"{k2}={v}"
                                       for k2, v in cell["err"].items()), flush=True)
        del lay
        torch.cuda.empty_cache()
    return {"device": props.name, "torch": torch.__version__, "group": args.group, "reps": args.reps,
            "num_sms": sms, "l2_bytes": l2, "ms": args.ms, "shapes": list(shapes), "cells": cells,
            "steps": steps(cells, args.ms), "seconds": time.time() - t0}


def good_time(cell: dict, meth: str) -> float | None:
    """The cell's microseconds for ``meth`` where it ran and its error is under MAX_ERR, else None."""
    err = cell["err"].get(meth, 0.0)
    us = cell["us"].get(meth)
    return us if us is not None and isinstance(err, float) and err < MAX_ERR else None


def steps(cells: list[dict], ms: list[int]) -> dict:
    """Per M: microseconds of one decode step's linears for each way of running them."""
    out: dict = {}
    for m in ms:
        row: dict = {}
        for cell in (c for c in cells if c["m"] == m):
            times = {k: good_time(cell, k) for k in ("bf16", "mma", "mma_rule", "mma_flat", "mma_kw")}
            times["dispatch"] = good_time(cell, "tinygemm" if m <= tinygemm_max_rows(cell["n"]) else "triton")
            best_mma = cell.get("mma_best", {}).get("us")
            known = [v for v in (times["mma"], times["mma_rule"], times["mma_flat"], times["mma_kw"], best_mma)
                     if v is not None]
            times["mma_best"] = min(known) if known else None
            int4 = [v for v in (good_time(cell, "tinygemm"), good_time(cell, "triton"), times["mma_best"])
                    if v is not None]
            times["best_int4"] = min(int4) if int4 else None
            mult = 1 if cell["name"] == "lm_head" else N_LAYERS
            for key, v in times.items():
                row[key] = None if v is None or row.get(key, 0.0) is None else row.get(key, 0.0) + mult * v
        out[str(m)] = row
    return out


def markdown(res: dict) -> str:
    keys = ("bf16", "dispatch", "mma", "mma_rule", "mma_flat", "mma_kw", "mma_best", "best_int4")
    lines = [f"# int4 mma kernel, {res['device']}, torch {res['torch']}, group {res['group']}", "",
             "Linears per decode step (16 layers x 4 + LM head), us (speed-up vs bf16):" if len(res.get("shapes", SHAPES))
             == len(SHAPES) else f"Linears per decode step, only {', '.join(res['shapes'])} (a layer's x16, the LM head "
             "once), us (speed-up vs bf16):", "",
             "| M | " + " | ".join(keys) + " |", "|---:|" + "---:|" * len(keys)]
    for m, row in res["steps"].items():
        b = row.get("bf16")
        lines.append(f"| {m} | " + " | ".join(
            "-" if row.get(k) is None else f"{row[k]:,.0f}" + ("" if not b or k == "bf16" else f" ({b / row[k]:.2f}x)")
            for k in keys) + " |")
    lines += ["", "Per shape, us (mma: the served config; rule: the rule's, as served before the measured table; "
              "flat, kw: the rule's FLAT and KW twins; best: the sweep's fastest correct config):", "",
              "| shape | M | bf16 | tinygemm | triton | mma | mma rule | mma flat | mma kw | mma best | best config | "
              "mma rel err |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|"]
    for c in res["cells"]:
        us, best = c["us"], c.get("mma_best", {})
        f = lambda v: "-" if v is None else f"{v:.1f}"          # noqa: E731
        err = c["err"].get("mma")
        lines.append(f"| {c['name']} {c['n']}x{c['k']} | {c['m']} | {f(us.get('bf16'))} | {f(us.get('tinygemm'))} | "
                     f"{f(us.get('triton'))} | {f(us.get('mma'))} | {f(us.get('mma_rule'))} | {f(us.get('mma_flat'))} | "
                     f"{f(us.get('mma_kw'))} | "
                     f"{f(best.get('us'))} | "
                     f"{best.get('config', '')} | {err if isinstance(err, str) else f'{err:.1e}'} |")
    return "\n".join(lines) + "\n"


def smoke(group: int) -> int:
    """``--smoke``: every row count 1..64 in steps, several configs, two small shapes; one line each."""
    bad = 0
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for n, k in ((256, 1024), (3072, 2048)):
        w = torch.randn(n, k, device="cuda") * 0.02
        q, sz32 = quantize_groupwise(w, group)
        sz = sz32.to(torch.bfloat16)
        words, scales = int4_mma.pack(q, sz, group)
        wd = dequantize_groupwise(q, sz, group)
        for m in (1, 2, 5, 8, 9, 16, 17, 31, 33, 64):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = x.float() @ wd.t()
            nt = int4_mma.token_tiles(m)
            kws = [int4_mma.Config(nt, r, wp, st, sp, 1, kw) for r, wp, st, sp, kw in
                   ((1, 16, 4, 1, 4), (2, 8, 3, 2, 2), (1, 4, 4, 4, 4), (1, 8, 4, 8, 4), (2, 16, 2, 1, 4))
                   if (k // 64) % sp == 0 and int4_mma.Config(nt, r, wp, st, sp, 1, kw).smem_bytes() <= int4_mma.MAX_SMEM]
            rule = int4_mma.rule_config(m, n, k, sms)
            cfgs = [None, rule, dataclasses.replace(rule, flat=1), kw_twin(rule), *kws] + [int4_mma.Config(nt, r, wp, st, sp, fl) for r, wp, st, sp in
                             ((1, 4, 4, 1), (2, 4, 3, 2), (1, 8, 6, 4), (4, 4, 4, 8), (2, 8, 4, 16), (1, 2, 4, 1))
                             for fl in (0, 1)
                             if (k // 64) % sp == 0
                             and int4_mma.Config(nt, r, wp, st, sp).smem_bytes() <= int4_mma.MAX_SMEM]
            for cfg in cfgs:
                try:
                    y = int4_mma.int4_mma_mm(x, words, scales, group, cfg)
                    y2 = int4_mma.int4_mma_mm(x, words, scales, group, cfg)     # tickets reset for the next launch
                    torch.cuda.synchronize()
                    err, same = rel_err(y, ref), bool(torch.equal(y, y2))
                    ok = err < MAX_ERR and same
                except Exception as e:                      # noqa: BLE001
                    err, same, ok = f"{e!r}"[:200], False, False
                bad += not ok
                print(f"smoke {n}x{k} M={m} {cfg or 'default'}: rel.err {err} repeat-identical {same} "
                      f"{'ok' if ok else 'FAIL'}", flush=True)
    print(f"smoke: {'all ok' if not bad else f'{bad} failed'}")
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("int4_mma_bench: no CUDA device; this benchmark needs a GPU", file=sys.stderr)
        return 2
    if not int4_mma.available():
        print("int4_mma_bench: the int4 mma kernel needs compute capability >= 8.0 and torch's NVRTC helpers",
              file=sys.stderr)
        return 2
    if args.smoke:
        return smoke(args.group)
    if args.once:
        for name in args.shapes:
            n, k = SHAPES[name]
            q, sz32 = quantize_groupwise(torch.randn(n, k, device="cuda") * 0.02, args.group)
            words, scales = int4_mma.pack(q, sz32.to(torch.bfloat16), args.group)
            for m in args.ms:
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                sms = torch.cuda.get_device_properties(0).multi_processor_count
                cfg, served = int4_mma.rule_config(m, n, k, sms), int4_mma.choose_config(m, n, k, sms)
                twice = dataclasses.replace(cfg, split=cfg.split * 2)     # why more CTAs ran slower at 64 rows
                more = [twice] if (k // int4_mma.BLOCK_K) % twice.split == 0 else []
                for c in [cfg, served, kw_twin(cfg), *more]:     # the rule, the served (tuned), KW, split x2
                    for _ in range(2):
                        int4_mma.int4_mma_mm(x, words, scales, args.group, c)
                    torch.cuda.synchronize()
                    print(f"once: {name} {n}x{k} M={m} {c}", flush=True)
        return 0
    res = run(args)
    report(args.out, "int4_mma", res, markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
