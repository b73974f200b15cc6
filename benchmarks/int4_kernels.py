"""GPU micro-benchmark of the INT4 weight-only linear kernels against bf16 cuBLAS, on llama-3.2-1b's shapes.

Methods (bf16 activations and outputs): bf16 ``x @ W.T`` (cuBLAS); tinygemm ``aten._weight_int4pack_mm`` (int4.py's
``tinygemm``/``mixed`` modes, packed the same way); triton ``model_server/int4_triton.int4_triton_mm`` (fused
dequantize + tensor-core GEMM, default config); gemv ``model_server/int4_gemv.int4_gemv_mm`` (the small-rows kernel,
default config, same layout as triton; M <= 16 unless a config says more); dequant (torch ops to bf16, then cuBLAS;
reference); triton-dequant ``model_server/int4_dequant.int4_dequant_mm`` (the served prefill path: one Triton pass to
bf16 from the triton layout, then cuBLAS). Shapes: the fast engine's, with q/k/v and gate/up merged (``--unmerged``: the seven separate projections).

Timing per (shape, M, method), CUDA events: ``eager`` = median over --reps of one call between two events (includes
CPU launch overhead when the GPU waits for it); ``graph`` = the calls captured back to back in a CUDA graph, median
replay time / calls per replay. Each method rotates over enough weight copies (>= --l2-multiple x L2, at most 256)
that weights come from HBM, as in a decode step. Also: relative error of every INT4 method against a float32
``x @ dequant(q).T`` per shape and M; a sweep (--no-sweep skips it) of the GEMM's and the small-rows kernel's
configs (benchmarks/int4_sweep.py), each config's error checked too, within --sweep-budget-s; a whole-step estimate
per M and method, 16 layers x (qkv, o, gate_up, down) + lm_head, with ``dispatch`` (what Int4Linear runs by default)
and ``best`` (per shape the fastest correct method or config). Writes int4_kernels.json / .md to --out
(benchmarks/int4_report.py makes the table).

  python3 benchmarks/int4_kernels.py --out DIR         # exits 2 with one line when there is no CUDA device
  python3 benchmarks/int4_kernels.py --redispatch DIR/int4_kernels.json   # no GPU: re-sum as today's code dispatches
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from int4_report import markdown, redispatch, redispatch_markdown, stack  # noqa: E402
from int4_sweep import gemm_configs, gemv_configs, sweep  # noqa: E402
from model_server import int4_dequant, int4_gemv, int4_triton  # noqa: E402
from model_server.int4 import GEMV_MAX_ROWS, INNER_K_TILES, choose_compute, step_kernel  # noqa: E402
from model_server.int4_quant import dequantize_groupwise, quantize_groupwise  # noqa: E402

UNMERGED = {"q_proj": (2048, 2048), "k_proj": (512, 2048), "v_proj": (512, 2048), "o_proj": (2048, 2048),
            "gate_proj": (8192, 2048), "up_proj": (8192, 2048), "down_proj": (2048, 8192)}      # (N out, K in)
MERGED = {"qkv_proj": (3072, 2048), "o_proj": (2048, 2048), "gate_up_proj": (16384, 2048), "down_proj": (2048, 8192)}
LAYER = MERGED
LM_HEAD = (128256, 2048)
N_LAYERS = 16
METHODS = ("bf16", "tinygemm", "triton", "gemv", "dequant", "triton-dequant")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    head, rest = __doc__.split("\n\n", 1)
    p = argparse.ArgumentParser(description=head, formatter_class=argparse.RawDescriptionHelpFormatter, epilog=rest)
    p.add_argument("--out", type=Path, default=None, help="directory for int4_kernels.json / .md")
    p.add_argument("--ms", default="1,8,16,64,256", help="rows M (comma-separated)")
    p.add_argument("--group", type=int, default=128, choices=(32, 64, 128, 256))
    p.add_argument("--reps", type=int, default=50, help="timed repeats per cell (>= 1)")
    p.add_argument("--l2-multiple", type=float, default=4.0, help="weight copies per method cover this x L2")
    p.add_argument("--no-sweep", action="store_true", help="skip the config sweeps")
    p.add_argument("--sweep-reps", type=int, default=10, help="timed graph replays per swept config")
    p.add_argument("--sweep-budget-s", type=float, default=0.0,
                   help="stop sweeping this many seconds after the start (0: no limit); M in --ms order")
    p.add_argument("--sweep-kernels", default="triton,gemv", help="which kernels' configs to sweep")
    p.add_argument("--sweep-ms", default=None, help="sweep only at these rows M (comma-separated; default: all)")
    p.add_argument("--wide-sweep", action="store_true",
                   help="above 64 rows: BLOCK_M 64/128 x BLOCK_N 64/128 x split K 1/2/4/8 x both scale modes")
    p.add_argument("--methods", default=",".join(METHODS), help="methods to time (bf16 is always timed)")
    p.add_argument("--no-lm-head", action="store_true")
    p.add_argument("--unmerged", action="store_true", help="the seven separate projections (before merging)")
    p.add_argument("--redispatch", type=Path, default=None, metavar="JSON",
                   help="no GPU: re-sum a recorded int4_kernels.json's linears per step as today's dispatch and "
                        "config choice would run them (int4_report.redispatch), print the table, exit")
    args = p.parse_args(argv)
    global LAYER
    LAYER = UNMERGED if args.unmerged else MERGED
    args.ms = [int(v) for v in args.ms.split(",") if v.strip()]
    args.sweep_ms = set(args.ms if args.sweep_ms is None else [int(v) for v in args.sweep_ms.split(",") if v.strip()])
    args.methods = ["bf16"] + [m for m in args.methods.split(",") if m in METHODS and m != "bf16"]
    args.sweep_kernels = [k for k in args.sweep_kernels.split(",") if k in ("triton", "gemv")]
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

    def __init__(self, n: int, k: int, group: int, l2_bytes: int, l2_multiple: float, methods: list[str]) -> None:
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
            if m not in methods and not (m == "triton" and {"gemv", "triton-dequant"} & set(methods)) and m != "bf16":
                self.copies[m] = [ts]                                       # error check only
                continue
            nbytes = sum(t.numel() * t.element_size() for t in ts)
            c = min(256, max(1, math.ceil(l2_multiple * l2_bytes / nbytes)))
            self.copies[m] = [ts] + [tuple(t.clone() for t in ts) for _ in range(c - 1)]
        self.copies["gemv"] = self.copies["triton-dequant"] = self.copies["triton"]

    def call(self, method: str, x: torch.Tensor, ts: tuple[torch.Tensor, ...], cfg=None):
        if method == "bf16":
            return lambda: x @ ts[0].t()
        if method == "tinygemm":
            return lambda: torch.ops.aten._weight_int4pack_mm(x, ts[0], self.group, ts[1])
        if method == "triton":
            return lambda: int4_triton.int4_triton_mm(x, ts[0], ts[1], ts[2], self.group, cfg)
        if method == "gemv":
            return lambda: int4_gemv.int4_gemv_mm(x, ts[0], ts[1], ts[2], self.group, cfg)
        if method == "triton-dequant":
            return lambda: int4_dequant.int4_dequant_mm(x, ts[0], ts[1], ts[2], self.group)
        return lambda: dequant_mm(x, ts[0], ts[1], self.group)

    def calls(self, method: str, x: torch.Tensor, cfg=None) -> list:
        return [self.call(method, x, ts, cfg) for ts in self.copies[method]]

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        return x.float() @ dequantize_groupwise(self.q, self.sz, self.group).t()

    def errors(self, x: torch.Tensor, ref: torch.Tensor, methods: list[str]) -> dict[str, float | str]:
        out: dict[str, float | str] = {}
        for m in methods:
            if m == "bf16" or (m == "gemv" and x.shape[0] > GEMV_MAX_ROWS):
                continue
            try:
                out[m] = rel_err(self.call(m, x, self.copies[m][0])(), ref)
            except Exception as e:                  # keep the other methods' numbers
                out[m] = f"error: {e!r}"[:300]
        return out


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.float() - ref).norm() / ref.norm())


def dispatch_method(capability: tuple[int, int]) -> Callable[[int, int], str]:
    """(m, n) -> the fixed method Int4Linear runs at m rows on a layer of n outputs with MODEL_SERVER_INT4_KERNELS=auto
    on this device."""
    ch = choose_compute("cuda", capability, triton=True, mode="auto")

    def pick(m: int, n: int) -> str:
        kernel = step_kernel(ch.int4_kernel, ch.rows_kernel, m, n)
        return "tinygemm" if kernel == "cuda-int4pack" else kernel
    return pick


def run(args: argparse.Namespace) -> dict:
    props = torch.cuda.get_device_properties(0)
    sms = props.multi_processor_count
    l2 = int(getattr(props, "L2_cache_size", 50 << 20))
    bk = int4_triton.block_k(args.group)
    shapes = {name: nk for name, nk in LAYER.items()}
    if not args.no_lm_head:
        shapes["lm_head"] = LM_HEAD
    cells: list[dict] = []
    errors: dict = {}
    sweeps: dict = {}
    built: dict = {}
    t0 = time.time()
    for name, (n, k) in shapes.items():
        if (n, k) in built:                                  # k/v, gate/up, q/o share a shape: time once
            continue
        sh = Shape(n, k, args.group, l2, args.l2_multiple, args.methods)
        xs = {}
        for m in args.ms:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = sh.reference(x)
            xs[m] = (x, ref)
            key = f"{n}x{k}/M{m}"
            errors[key] = sh.errors(x, ref, args.methods)
            for method in args.methods:
                if method == "gemv" and m > GEMV_MAX_ROWS:
                    continue
                cell = {"n": n, "k": k, "m": m, "method": method, "eager_us": None, "graph_us": None,
                        "copies": len(sh.copies[method])}
                if method == "triton":
                    cell["config"] = vars(int4_triton.choose_config(m, n, k, bk, sms))
                if method == "gemv":
                    cell["config"] = vars(int4_gemv.choose_gemv_config(m, n, k, bk, sms))
                try:
                    cell["eager_us"], cell["graph_us"] = time_calls(sh.calls(method, x), args.reps)
                except Exception as e:              # e.g. a Triton version the kernel does not compile on
                    cell["error"] = f"{e!r}"[:300]
                    print(f"{name} M={m} {method}: {cell['error']}", flush=True)
                cells.append(cell)
            bad = [mm for mm, e in errors[key].items() if not (isinstance(e, float) and e < 1e-2)]
            print(f"[{time.time() - t0:6.1f}s] {name} {n}x{k} M={m} rel.err "
                  + " ".join(f"{mm}={e:.2e}" if isinstance(e, float) else f"{mm}={e}" for mm, e in errors[key].items())
                  + (f"  BAD: {bad}" if bad else ""), flush=True)
        built[(n, k)] = (name, sh, xs)
    deadline = t0 + args.sweep_budget_s if args.sweep_budget_s > 0 else float("inf")
    for m in ([] if args.no_sweep else [m for m in args.ms if m in args.sweep_ms]):
        for (n, k), (name, sh, xs) in built.items():
            x, ref = xs[m]
            configs = [("gemv", c) for c in gemv_configs(m, n, k, args.group, sms)
                       if "gemv" in args.sweep_kernels and m <= 64]
            configs += [("triton", c) for c in gemm_configs(m, n, k, args.group, sms, args.wide_sweep)
                        if "triton" in args.sweep_kernels]
            label = f"{name} {n}x{k} M={m}"
            rows = sweep(lambda method, cfg: sh.calls(method, x, cfg), lambda call: rel_err(call(), ref), configs,
                         args.sweep_reps, time_calls, deadline, label)
            sweeps[f"{n}x{k}/M{m}"] = rows
            timed = sorted((r for r in rows if r.get("graph_us") is not None), key=lambda r: r["graph_us"])
            print(f"[{time.time() - t0:6.1f}s] {label} sweep: {len(timed)}/{len(configs)} timed; fastest "
                  + ", ".join(f"{r['method']} {r['graph_us']:.1f}" for r in timed[:3]), flush=True)
    res = {"device": props.name, "torch": torch.__version__, "triton": int4_triton.triton.__version__,
           "group": args.group, "reps": args.reps, "sweep_reps": args.sweep_reps, "ms": args.ms,
           "shapes": {k: list(v) for k, v in shapes.items()}, "l2_bytes": l2, "num_sms": sms, "cells": cells,
           "rel_errors": errors, "sweeps": sweeps}
    res["stack"] = stack(res, LAYER, N_LAYERS, dispatch_method(torch.cuda.get_device_capability(0)))
    res["seconds"] = time.time() - t0
    return res


def print_redispatch(path: Path) -> int:
    """``--redispatch``: :func:`int4_report.redispatch_markdown` of a recorded result (one-line error on a bad file)."""
    try:
        res = json.loads(path.read_text())
        print(redispatch_markdown(str(path), res, redispatch(
            res, LAYER, N_LAYERS, dispatch_method((9, 0)), lambda m, n, k: vars(int4_triton.choose_config(
                m, n, k, int4_triton.block_k(res["group"]), res["num_sms"])))))
    except (OSError, ValueError, KeyError, TypeError) as e:
        print(f"int4_kernels: cannot re-sum {path}: {e!r}"[:300], file=sys.stderr)
        return 2
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.redispatch:
        return print_redispatch(args.redispatch)
    if not torch.cuda.is_available():
        print("int4_kernels: no CUDA device; this benchmark needs a GPU", file=sys.stderr)
        return 2
    if not int4_triton.available():
        print("int4_kernels: Triton is not importable", file=sys.stderr)
        return 2
    res = run(args)
    report(args.out, "int4_kernels", res, markdown(res, LAYER, N_LAYERS))
    return 0


def report(out: Path | None, stem: str, res: dict, md: str) -> None:
    """Print ``md``; with ``out``, also write ``out/stem.json`` (``res``) and ``out/stem.md``."""
    print(md)
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{stem}.json").write_text(json.dumps(res, indent=1))
        (out / f"{stem}.md").write_text(md)


if __name__ == "__main__":
    sys.exit(main())
