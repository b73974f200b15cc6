"""GPU A/B of the INT4 Triton GEMM's split-K reduction: ``ticket`` (each tile's last program sums the partials, one
launch) against ``kernel`` (a second sum kernel, MODEL_SERVER_INT4_TRITON_SPLIT_REDUCE=kernel), per llama-3.2-1b linear.

Timing: per linear (merged q/k/v, o, merged gate/up, down, LM head) and rows M (--ms, default 16,32,64), the GEMM
(``int4_triton.int4_triton_mm``) at its default config with each reduction, as benchmarks/int4_kernels.py times a
method (its ``time_calls`` and ``Shape``): calls captured back to back in a CUDA graph, rotating over weight copies
that cover --l2-multiple x L2 (weights from HBM), median replay time per call over --reps replays; also eager (one
call between two events, median). --rounds rounds in the order kernel, ticket, ticket, kernel, ... (drift cancels);
every round is kept, the table shows the fastest. Per decode step: 16 layers x (q/k/v, o, gate/up, down) + the LM head.
Check: at every M in 1..--check-rows on every linear, both reductions against a float32 ``x @ dequant(W)^T``
(relative error ||y - ref|| / ||ref||, the largest per reduction) and ticket == kernel bit for bit, and after each
timed cell every ticket counter back at zero; exit 1 when any fails. Writes int4_splitk.json / .md to --out (card,
commit, command).

  python3 benchmarks/int4_splitk_bench.py --out DIR --commit SHA  # exits 2 (one line) without a CUDA device
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from int4_kernels import LM_HEAD, MERGED, N_LAYERS, Shape, rel_err, report, time_calls  # noqa: E402
from model_server import int4_triton, int4_triton_split  # noqa: E402
from model_server.int4_quant import dequantize_groupwise  # noqa: E402
from support import command_line, default_commit  # noqa: E402

MODES = ("kernel", "ticket")
DEVICE, DTYPE = "cuda", torch.bfloat16     # of the activations (the CPU test runs the interpreter in float32)
MAX_ERR = 1e-2
SHAPES = dict(MERGED, lm_head=LM_HEAD)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    head, rest = __doc__.split("\n\n", 1)
    p = argparse.ArgumentParser(description=head, formatter_class=argparse.RawDescriptionHelpFormatter, epilog=rest)
    p.add_argument("--out", type=Path, default=None, help="directory for int4_splitk.json / .md")
    p.add_argument("--ms", default="16,32,64", help="rows M to time (comma-separated)")
    p.add_argument("--check-rows", type=int, default=64, help="check every M in 1..this on every linear (0: no check)")
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"of {', '.join(SHAPES)}")
    p.add_argument("--group", type=int, default=128, choices=(32, 64, 128, 256))
    p.add_argument("--reps", type=int, default=50, help="timed replays (and eager calls) per round (>= 1)")
    p.add_argument("--rounds", type=int, default=2, help="timing rounds per reduction (>= 1)")
    p.add_argument("--l2-multiple", type=float, default=4.0, help="weight copies cover this x L2")
    p.add_argument("--commit", default=default_commit())
    args = p.parse_args(argv)
    args.ms = [int(v) for v in args.ms.split(",") if v.strip()]
    args.shapes = [s for s in args.shapes.split(",") if s.strip()]
    bad = [s for s in args.shapes if s not in SHAPES]
    if not args.ms or min(args.ms) < 1 or args.reps < 1 or args.rounds < 1 or args.check_rows < 0 or bad:
        p.error(f"--ms needs positive integers, --reps and --rounds >= 1, --check-rows >= 0, --shapes of "
                f"{', '.join(SHAPES)}" + (f" (not {', '.join(bad)})" if bad else ""))
    return args


def order(rounds: int) -> list[str]:
    """The reductions in timing order: kernel, ticket, ticket, kernel, kernel, ticket, ... (``rounds`` each)."""
    return [m for r in range(rounds) for m in (MODES if r % 2 == 0 else MODES[::-1])]


def check(weights: dict[str, tuple[tuple[torch.Tensor, ...], torch.Tensor]], rows: list[int], group: int,
          dtype: torch.dtype) -> dict:
    """Both reductions at each of ``rows`` on each linear of ``weights`` (name -> ((packed, scales, zeros), the
    float32 dequantized weight [N, K])) with the default config, against ``x.float() @ w.t()``: the largest relative
    error per reduction, whether every ticket result equals the kernel's bit for bit, and the cells that fail."""
    worst = {mode: 0.0 for mode in MODES}
    cells, bad = [], []
    for name, (tri, w) in weights.items():
        n, k = w.shape
        for m in rows:
            x = torch.randn(m, k, device=w.device).to(dtype)
            ref = x.float() @ w.t()
            ys = {mode: int4_triton.int4_triton_mm(x, *tri, group, split_reduce=mode) for mode in MODES}
            cell = {"name": name, "m": m, "split_k": int4_triton.choose_config(
                        m, n, k, int4_triton.block_k(group), int4_triton._num_sms(w.device)).split_k,
                    "identical": bool(torch.equal(ys["ticket"], ys["kernel"]))}
            for mode in MODES:
                cell[f"err_{mode}"] = rel_err(ys[mode], ref)
                worst[mode] = max(worst[mode], cell[f"err_{mode}"])
            if not cell["identical"] or not max(cell["err_ticket"], cell["err_kernel"]) < MAX_ERR:
                bad.append(cell)
            cells.append(cell)
    return {"max_rel_err": worst, "identical": all(c["identical"] for c in cells), "cells": len(cells),
            "failures": bad, "ok": not bad, "rows": cells}


def run(args: argparse.Namespace) -> dict:
    props = torch.cuda.get_device_properties(0)
    sms, l2 = props.multi_processor_count, int(getattr(props, "L2_cache_size", 50 << 20))
    bk = int4_triton.block_k(args.group)
    t0 = time.time()
    cells: list[dict] = []
    checked: dict = {}
    for name in args.shapes:
        n, k = SHAPES[name]
        sh = Shape(n, k, args.group, l2, args.l2_multiple, ["bf16", "triton"])
        if args.check_rows:
            w = dequantize_groupwise(sh.q, sh.sz, args.group).float()
            checked[name] = check({name: (sh.copies["triton"][0], w)}, list(range(1, args.check_rows + 1)),
                                  args.group, DTYPE)
            del w
            c = checked[name]
            print(f"[{time.time() - t0:6.1f}s] {name} {n}x{k} check M=1..{args.check_rows}: max rel.err ticket "
                  f"{c['max_rel_err']['ticket']:.2e} kernel {c['max_rel_err']['kernel']:.2e}, bit-identical "
                  f"{c['identical']}" + ("" if c["ok"] else f"  FAILED {len(c['failures'])} cells"), flush=True)
        for m in args.ms:
            x = torch.randn(m, k, device=DEVICE, dtype=DTYPE)
            cfg = int4_triton.choose_config(m, n, k, bk, sms)
            cell: dict = {"name": name, "n": n, "k": k, "m": m, "config": vars(cfg), "copies": len(sh.copies["triton"]),
                          "graph_us": {mode: [] for mode in MODES}, "eager_us": {mode: [] for mode in MODES}}
            for mode in order(args.rounds):
                calls = [_call(x, ts, args.group, mode) for ts in sh.copies["triton"]]
                eager, graph = time_calls(calls, args.reps)
                cell["eager_us"][mode].append(eager)
                cell["graph_us"][mode].append(graph)
            torch.cuda.synchronize()            # every launch, eager and replayed, must leave its counters at zero
            cell["counters_zero"] = all(not t.any() for t in int4_triton_split._COUNTERS.values())
            cells.append(cell)
            g = {mode: min(cell["graph_us"][mode]) for mode in MODES}
            print(f"[{time.time() - t0:6.1f}s] {name} {n}x{k} M={m} split {cfg.split_k}: graph kernel "
                  f"{g['kernel']:.2f} us, ticket {g['ticket']:.2f} us"
                  + ("" if cell["counters_zero"] else "  FAILED: ticket counters not zero"), flush=True)
        del sh
        torch.cuda.empty_cache()
    failed = [c for c in checked.values() if not c["ok"]] + [c for c in cells if not c["counters_zero"]]
    return {"card": props.name, "commit": args.commit, "command": command_line("benchmarks/int4_splitk_bench.py"),
            "torch": torch.__version__, "triton": int4_triton.triton.__version__, "num_sms": sms, "l2_bytes": l2,
            "group": args.group, "reps": args.reps, "rounds": args.rounds, "ms": args.ms,
            "shapes": {s: list(SHAPES[s]) for s in args.shapes}, "cells": cells, "steps": steps(cells, args.ms),
            "check": {"rows": args.check_rows, "ok": not failed, "per_shape": checked}, "seconds": time.time() - t0}


def _call(x: torch.Tensor, ts: tuple[torch.Tensor, ...], group: int, mode: str) -> Callable[[], torch.Tensor]:
    return lambda: int4_triton.int4_triton_mm(x, ts[0], ts[1], ts[2], group, split_reduce=mode)


def steps(cells: list[dict], ms: list[int]) -> dict:
    """Per M, the fastest graph time of each reduction summed over a decode step's linears (``N_LAYERS`` x the four
    merged projections + the LM head); only where every one of them was timed."""
    per_step = {name: N_LAYERS for name in MERGED} | {"lm_head": 1}
    out: dict = {}
    for m in ms:
        row = {c["name"]: c for c in cells if c["m"] == m}
        if set(row) == set(per_step):
            out[str(m)] = {mode: sum(per_step[s] * min(row[s]["graph_us"][mode]) for s in per_step) for mode in MODES}
    return out


def markdown(res: dict) -> str:
    """The result as a small table: per linear and M, graph us per call for each reduction, and per decode step."""
    lines = [f"# INT4 Triton GEMM, split-K reduction: ticket vs kernel ({res['card']}, commit {res['commit']})", "",
             f"`{res['command']}`; CUDA graph, median of {res['reps']} replays, fastest of {res['rounds']} rounds "
             f"(eager in brackets); us per call", "",
             "| linear | N x K | M | split | kernel | ticket | ticket - kernel |", "|---|---|---|---|---|---|---|"]
    for c in res["cells"]:
        g = {mode: min(c["graph_us"][mode]) for mode in MODES}
        e = {mode: min(c["eager_us"][mode]) for mode in MODES}
        lines.append(f"| {c['name']} | {c['n']} x {c['k']} | {c['m']} | {c['config']['split_k']} | "
                     f"{g['kernel']:.2f} ({e['kernel']:.1f}) | {g['ticket']:.2f} ({e['ticket']:.1f}) | "
                     f"{g['ticket'] - g['kernel']:+.2f} |")
    if res["steps"]:
        lines += ["", f"Per decode step ({N_LAYERS} layers x 4 linears + LM head), graph us:", "",
                  "| M | kernel | ticket | ticket - kernel |", "|---|---|---|---|"]
        for m, s in res["steps"].items():
            lines.append(f"| {m} | {s['kernel']:.1f} | {s['ticket']:.1f} | {s['ticket'] - s['kernel']:+.1f} |")
    chk = res["check"]
    dirty = [f"{c['name']} M={c['m']}" for c in res["cells"] if not c.get("counters_zero", True)]
    if dirty:
        lines += ["", f"FAILED: ticket counters not back at zero after {', '.join(dirty)}"]
    if chk["rows"]:
        lines += ["", f"Check, M = 1..{chk['rows']} on every linear, against float32: "
                  + ("ok" if chk["ok"] else "FAILED"), ""]
        for name, c in chk["per_shape"].items():
            lines.append(f"- {name}: max rel.err ticket {c['max_rel_err']['ticket']:.2e}, kernel "
                         f"{c['max_rel_err']['kernel']:.2e}; ticket == kernel bit for bit: {c['identical']}"
                         + ("" if c["ok"] else f"; failing M: {', '.join(str(f['m']) for f in c['failures'])}"))
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("int4_splitk_bench: no CUDA device; this benchmark needs a GPU", file=sys.stderr)
        return 2
    if not int4_triton.available():
        print("int4_splitk_bench: Triton is not importable", file=sys.stderr)
        return 2
    res = run(args)
    report(args.out, "int4_splitk", res, markdown(res))
    return 0 if res["check"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
