"""GPU micro-benchmark of the INT4 weight-only linear kernels against bf16 cuBLAS, on llama-3.2-1b's shapes.

Methods (bf16 activations and outputs): bf16 ``x @ W.T`` (cuBLAS); tinygemm ``aten._weight_int4pack_mm`` (what
``model_server/int4.py`` runs on CUDA up to 8 rows, packed the same way); triton ``model_server/int4_triton.int4_triton_mm``
(fused dequantize + tensor-core GEMM, its default config; what int4.py runs above 8 rows); dequant (torch ops to bf16,
then cuBLAS; reference). Shapes: the fast engine's, with q/k/v and gate/up merged (``--unmerged``: the seven separate
projections).

Timing per (shape, M, method), CUDA events: ``eager`` = median over --reps of one call between two events (includes
CPU launch overhead when the GPU waits for it); ``graph`` = the calls captured back to back in a CUDA graph, median
replay time / calls per replay. Each method rotates over enough weight copies (>= --l2-multiple x L2, at most 256)
that weights come from HBM, as in a decode step. Also: relative error of tinygemm / triton / dequant against a
float32 ``x @ dequant(q).T`` per shape and M; a Triton config sweep (--no-sweep skips it); a whole-model estimate
per M and method, 16 layers x (qkv, o, gate_up, down) + lm_head, and ``dispatch``: what Int4Linear runs (tinygemm up
to 8 rows, Triton above). Writes int4_kernels.json / .md to --out.

  python3 benchmarks/int4_kernels.py --out DIR         # exits 2 with one line when there is no CUDA device
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from model_server import int4_triton  # noqa: E402
from model_server.int4 import INNER_K_TILES, TINYGEMM_MAX_ROWS, dequantize_groupwise, quantize_groupwise  # noqa: E402

UNMERGED = {"q_proj": (2048, 2048), "k_proj": (512, 2048), "v_proj": (512, 2048), "o_proj": (2048, 2048),
            "gate_proj": (8192, 2048), "up_proj": (8192, 2048), "down_proj": (2048, 8192)}      # (N out, K in)
MERGED = {"qkv_proj": (3072, 2048), "o_proj": (2048, 2048), "gate_up_proj": (16384, 2048), "down_proj": (2048, 8192)}
LAYER = MERGED
LM_HEAD = (128256, 2048)
N_LAYERS = 16
METHODS = ("bf16", "tinygemm", "triton", "dequant")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    head, rest = __doc__.split("\n\n", 1)
    p = argparse.ArgumentParser(description=head, formatter_class=argparse.RawDescriptionHelpFormatter, epilog=rest)
    p.add_argument("--out", type=Path, default=None, help="directory for int4_kernels.json / .md")
    p.add_argument("--ms", default="1,8,16,64,256", help="rows M (comma-separated)")
    p.add_argument("--group", type=int, default=128, choices=(32, 64, 128, 256))
    p.add_argument("--reps", type=int, default=50, help="timed repeats per cell (>= 1)")
    p.add_argument("--l2-multiple", type=float, default=4.0, help="weight copies per method cover this x L2")
    p.add_argument("--no-sweep", action="store_true", help="skip the Triton config sweep")
    p.add_argument("--sweep-ms", default=None, help="sweep only at these rows M (comma-separated; default: all)")
    p.add_argument("--wide-sweep", action="store_true",
                   help="above 64 rows: BLOCK_M 64/128 x BLOCK_N 64/128 x split K 1/2/4/8 x both scale modes")
    p.add_argument("--methods", default=",".join(METHODS), help="methods to time (bf16 is always timed)")
    p.add_argument("--no-lm-head", action="store_true")
    p.add_argument("--unmerged", action="store_true", help="the seven separate projections (before merging)")
    args = p.parse_args(argv)
    global LAYER
    LAYER = UNMERGED if args.unmerged else MERGED
    args.ms = [int(v) for v in args.ms.split(",") if v.strip()]
    args.sweep_ms = set(args.ms if args.sweep_ms is None else [int(v) for v in args.sweep_ms.split(",") if v.strip()])
    args.methods = ["bf16"] + [m for m in args.methods.split(",") if m in METHODS and m != "bf16"]
    if not args.ms or min(args.ms) < 1 or args.reps < 1:
        p.error("--ms needs positive integers and --reps >= 1")
    return args


def time_calls(calls: list, reps: int, eager: bool = True) -> tuple[float | None, float]:
    """(eager us per call or None, graph us per call); ``calls`` rotate over weight copies."""
    def _events(n: int) -> list[tuple[torch.cuda.Event, torch.cuda.Event]]:
        return [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]

    def _median_ms(pairs: list[tuple[torch.cuda.Event, torch.cuda.Event]]) -> float:
        torch.cuda.synchronize()
        return statistics.median(a.elapsed_time(b) for a, b in pairs)

    for i in range(max(5, len(calls))):
        calls[i % len(calls)]()
    eager_us = None
    if eager:
        ev = _events(reps)
        for i, (a, b) in enumerate(ev):
            a.record()
            calls[i % len(calls)]()
            b.record()
        eager_us = _median_ms(ev) * 1e3
    seq = [calls[i % len(calls)] for i in range(max(len(calls), 8))]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):                  # warm-up on a side stream before capture (allocator)
        for c in seq:
            c()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in seq:
            c()
    graph.replay()
    ev = _events(reps)
    for a, b in ev:
        a.record()
        graph.replay()
        b.record()
    graph_us = _median_ms(ev) * 1e3 / len(seq)
    del graph
    return eager_us, graph_us


def dequant_mm(x: torch.Tensor, plain: torch.Tensor, sz: torch.Tensor, group: int) -> torch.Tensor:
    n, k = plain.shape[0], plain.shape[1] * 2
    q = torch.stack((plain >> 4, plain & 15), dim=-1).view(n, k // group, group)
    w = (q.to(torch.bfloat16) - 8) * sz[..., 0].t().unsqueeze(-1) + sz[..., 1].t().unsqueeze(-1)
    return x @ w.view(n, k).t()


class Shape:
    """One weight [N, K] in every method's format, with copies for rotation."""

    def __init__(self, n: int, k: int, group: int, l2_bytes: int, l2_multiple: float) -> None:
        self.n, self.k, self.group = n, k, group
        w = torch.randn(n, k, device="cuda") * 0.02
        self.q, sz32 = quantize_groupwise(w, group)
        self.sz = sz32.to(torch.bfloat16)                                   # [K/g, N, 2]
        wb = w.to(torch.bfloat16)
        del w, sz32
        plain = (self.q[:, ::2] << 4 | self.q[:, 1::2]).to(torch.uint8).contiguous()     # as int4.py packs
        tiny = torch.ops.aten._convert_weight_to_int4pack(plain, INNER_K_TILES)
        tri = (int4_triton.pack_int4(self.q, group), *int4_triton.split_scales_and_zeros(self.sz))
        base = {"bf16": (wb,), "tinygemm": (tiny, self.sz), "triton": tri, "dequant": (plain, self.sz)}
        self.copies: dict[str, list[tuple[torch.Tensor, ...]]] = {}
        for m, ts in base.items():
            nbytes = sum(t.numel() * t.element_size() for t in ts)
            c = min(256, max(1, math.ceil(l2_multiple * l2_bytes / nbytes)))
            self.copies[m] = [ts] + [tuple(t.clone() for t in ts) for _ in range(c - 1)]

    def call(self, method: str, x: torch.Tensor, ts: tuple[torch.Tensor, ...], cfg=None):
        if method == "bf16":
            return lambda: x @ ts[0].t()
        if method == "tinygemm":
            return lambda: torch.ops.aten._weight_int4pack_mm(x, ts[0], self.group, ts[1])
        if method == "triton":
            return lambda: int4_triton.int4_triton_mm(x, ts[0], ts[1], ts[2], self.group, cfg)
        return lambda: dequant_mm(x, ts[0], ts[1], self.group)

    def calls(self, method: str, x: torch.Tensor, cfg=None) -> list:
        return [self.call(method, x, ts, cfg) for ts in self.copies[method]]

    def errors(self, x: torch.Tensor) -> dict[str, float | str]:
        ref = x.float() @ dequantize_groupwise(self.q, self.sz, self.group).t()
        out: dict[str, float | str] = {}
        for m in METHODS[1:]:
            try:
                out[m] = float((self.call(m, x, self.copies[m][0])().float() - ref).norm() / ref.norm())
            except Exception as e:                  # keep the other methods' numbers
                out[m] = f"error: {e!r}"[:300]
        return out


def sweep_configs(m: int, n: int, k: int, group: int, wide: bool = False) -> list[int4_triton.Config]:
    """Both operand orders x both scale modes x BLOCK_N 64/128 x split K (heuristic's, 1); BLOCK_M 64/128 past 64.
    ``wide`` past 64 rows: normal order, BLOCK_M 64/128 x BLOCK_N 64/128 x split K 1/2/4/8 x both scale modes."""
    bk = int4_triton.block_k(group)
    base = int4_triton.choose_config(m, n, k, bk, torch.cuda.get_device_properties(0).multi_processor_count)
    if wide and m > 64:
        iters = k // bk
        return [int4_triton.Config(bm, bn, sp, 3, 8 if bm * bn >= 16384 else 4, False, fold)
                for bm in (64, 128) for bn in (64, 128) for sp in (1, 2, 4, 8) if iters % sp == 0 and iters // sp >= 2
                for fold in (True, False)]
    out = []
    for bm in ((64, 128) if m > 64 else (base.block_m,)):
        for bn in (64, 128):
            for split in sorted({1, base.split_k}):
                for swap in (True, False):
                    for fold in (True, False):
                        out.append(int4_triton.Config(bm, bn, split, 4 if bm <= 32 else 3,
                                                      8 if bm * bn >= 8192 else 4, swap, fold))
    return out


def cfg_str(c: dict) -> str:
    return (f"{c['block_m']}/{c['block_n']}/s{c['split_k']}/st{c['num_stages']}/w{c['num_warps']}/"
            f"{'T' if c['swap_ab'] else 'N'}{'F' if c['fold'] else 'D'}")


def run(args: argparse.Namespace) -> dict:
    props = torch.cuda.get_device_properties(0)
    l2 = int(getattr(props, "L2_cache_size", 50 << 20))
    shapes = {name: nk for name, nk in LAYER.items()}
    if not args.no_lm_head:
        shapes["lm_head"] = LM_HEAD
    cells, errors, best, seen = [], {}, {}, {}
    t0 = time.time()
    for name, (n, k) in shapes.items():
        if (n, k) in seen:                                   # k/v, gate/up, q/o share a shape: time once
            continue
        seen[(n, k)] = name
        sh = Shape(n, k, args.group, l2, args.l2_multiple)
        for m in args.ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            key = f"{n}x{k}/M{m}"
            errors[key] = sh.errors(x)
            for method in args.methods:
                cell = {"n": n, "k": k, "m": m, "method": method, "eager_us": None, "graph_us": None,
                        "copies": len(sh.copies[method])}
                if method == "triton":
                    cell["config"] = vars(int4_triton.choose_config(m, n, k, int4_triton.block_k(args.group),
                                                                    props.multi_processor_count))
                try:
                    cell["eager_us"], cell["graph_us"] = time_calls(sh.calls(method, x), args.reps)
                except Exception as e:              # e.g. a Triton version the kernel does not compile on
                    cell["error"] = f"{e!r}"[:300]
                    print(f"{name} M={m} {method}: {cell['error']}", flush=True)
                cells.append(cell)
            if not args.no_sweep and m in args.sweep_ms:
                timed = []
                for c in sweep_configs(m, n, k, args.group, args.wide_sweep):
                    try:
                        timed.append((time_calls(sh.calls("triton", x, c), max(10, args.reps // 5), False)[1], c))
                    except Exception as e:
                        print(f"{name} M={m} sweep {c}: {e!r}"[:300], flush=True)
                if timed:
                    us, c = min(timed, key=lambda t: t[0])
                    best[key] = {"graph_us": us, "config": vars(c)}
            bad = [mm for mm, e in errors[key].items() if not (isinstance(e, float) and e < 1e-2)]
            print(f"[{time.time() - t0:6.1f}s] {name} {n}x{k} M={m} rel.err "
                  + " ".join(f"{mm}={e:.2e}" if isinstance(e, float) else f"{mm}={e}" for mm, e in errors[key].items())
                  + (f"  BAD: {bad}" if bad else ""), flush=True)
        del sh
        torch.cuda.empty_cache()
    return {"device": props.name, "torch": torch.__version__, "triton": int4_triton.triton.__version__,
            "group": args.group, "reps": args.reps, "shapes": {k: list(v) for k, v in shapes.items()}, "l2_bytes": l2, "cells": cells, "rel_errors": errors,
            "triton_sweep_best": best, "stack": stack(cells, best, args.ms, shapes), "seconds": time.time() - t0}


def stack(cells: list[dict], best: dict, ms: list[int], shapes: dict) -> dict:
    """Per M and method: sum of 16 x one layer's 7 linears + lm_head (us), and bf16 / method."""
    t = {(c["n"], c["k"], c["m"], c["method"]): c for c in cells}
    for key, b in best.items():
        nk, m = key.split("/M")
        n, k = map(int, nk.split("x"))
        t[(n, k, int(m), "triton-best")] = {"graph_us": b["graph_us"], "eager_us": None}
    out = {}
    for m in ms:
        row = {}
        for method in METHODS + ("dispatch",) + (("triton-best",) if best else ()):
            src = method if method != "dispatch" else ("tinygemm" if m <= TINYGEMM_MAX_ROWS else "triton")
            for mode in ("graph_us", "eager_us"):
                vals = [t.get((n, k, m, src), {}).get(mode) for n, k in LAYER.values()]
                head = [t.get((*shapes["lm_head"], m, src), {}).get(mode)] if "lm_head" in shapes else []
                if all(v is not None for v in vals + head):
                    row[f"{method}/{mode}"] = N_LAYERS * sum(vals) + sum(head)
        for key in list(row):
            base = row.get("bf16/" + key.split("/")[1])
            row[key.replace("_us", "_speedup")] = base / row[key] if base else None
        out[str(m)] = row
    return out


def markdown(res: dict) -> str:
    lines = [f"# INT4 kernels, {res['device']} (torch {res['torch']}, triton {res['triton']}, group {res['group']})",
             "", "Per linear, us per call: CUDA graph (eager). Triton configs: BLOCK_M/BLOCK_N/split-K/stages/warps/"
             "order (T: swap-AB, N: normal) + scale mode (F: fold, D: dequant).", "",
             "| shape N x K | M | bf16 | tinygemm | triton | dequant | triton best (sweep) | triton cfg |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    rows: dict = {}
    for c in res["cells"]:
        rows.setdefault((c["n"], c["k"], c["m"]), {})[c["method"]] = c
    for (n, k, m), r in rows.items():
        cfg = r.get("triton", {}).get("config", {})
        b = res["triton_sweep_best"].get(f"{n}x{k}/M{m}")
        best = f"{b['graph_us']:.1f} ({cfg_str(b['config'])})" if b else "-"
        f = lambda v: "err" if v is None else f"{v:.1f}"                                   # noqa: E731
        cols = [f"{f(r[mm]['graph_us'])} ({f(r[mm]['eager_us'])})" if mm in r else "-" for mm in METHODS]
        lines.append(f"| {n} x {k} | {m} | " + " | ".join(cols) + f" | {best} | {cfg_str(cfg) if cfg else '-'} |")
    methods = METHODS + ("dispatch",) + (("triton-best",) if res["triton_sweep_best"] else ())
    lines += ["", f"Whole model estimate ({N_LAYERS} layers x {len(LAYER)} linears + lm_head), us per step (speedup vs "
              "bf16); graph timings, eager in brackets. dispatch: Int4Linear's choice (tinygemm up to "
              f"{TINYGEMM_MAX_ROWS} rows, Triton above).", "",
              "| M | " + " | ".join(methods) + " |", "|---:|" + "---:|" * len(methods)]
    for m, row in res["stack"].items():
        cols = []
        for method in methods:
            g, e = row.get(f"{method}/graph_us"), row.get(f"{method}/eager_us")
            cols.append(f"{g:.0f} ({row[f'{method}/graph_speedup']:.2f}x)" + (f" [{e:.0f}]" if e else "")
                        if g else "-")
        lines.append(f"| {m} | " + " | ".join(cols) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("int4_kernels: no CUDA device; this benchmark needs a GPU", file=sys.stderr)
        return 2
    if not int4_triton.available():
        print("int4_kernels: Triton is not importable", file=sys.stderr)
        return 2
    res = run(args)
    md = markdown(res)
    print(md)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "int4_kernels.json").write_text(json.dumps(res, indent=1))
        (args.out / "int4_kernels.md").write_text(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
