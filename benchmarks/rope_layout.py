"""GPU micro-benchmark: the fused rotary embedding of a prefill pass in the head-major layout it runs in today
against the same op on the token-major layout the q/k/v projection writes (issue 17).

The 4,096-token prefill profile on an H200 (docs/benchmarks.md, "The wave's prefill as one graph") spent 2.5 of its
17.3 ms of kernels in the two compiled rotary kernels (124 us per layer for q), about ten times what reading and
writing q once takes at that card's bandwidth. The prefill applies rotary to ``q.view(n, t, H, D).transpose(1, 2)``
(head-major views into the merged projection's output); this script times the same compiled op
(``engines/fast/fused.Ops``) on those views (``head_major``), on the token-major views before the transpose
(``token_major``: ``cos``/``sin`` broadcast as ``[1, t, 1, D]``, the result transposed after), both again compiled
for static shapes (``*_static``: the engine compiles with ``dynamic=True``), dynamic with the head and head-dim
axes (``marked_hd``) and also the token axis (``marked_hdt``) marked static, compiled static but for the prompt
and token axes marked dynamic (``rows_dynamic``: one compile for every prefill size, head axes constant; what the
engine serves with ``MODEL_SERVER_FAST_COMPILE_SHAPES=rows``), the engine's Triton kernel for it
(``triton_kernel``: :mod:`model_server.engines.fast.rope_prefill`, token-major), and eagerly, and checks that every
variant gives the same bits. Prints one JSON object (and writes it to --out).

  python3 benchmarks/rope_layout.py --n 64 --t 64 --out DIR      # exits 2 with one line without a CUDA device
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gemv_probe import graph_us  # noqa: E402
from model_server.engines.fast import rope_kv  # noqa: E402
from model_server.engines.fast.fused import SHAPES_SWITCH, Ops, mark_rows, rope  # noqa: E402
from model_server.engines.fast.rope_prefill import rope_prefill  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    head, rest = __doc__.split("\n\n", 1)
    p = argparse.ArgumentParser(description=head, formatter_class=argparse.RawDescriptionHelpFormatter, epilog=rest)
    p.add_argument("--n", type=int, default=64, help="prompts in the pass")
    p.add_argument("--t", type=int, default=64, help="tokens per prompt")
    p.add_argument("--heads", type=int, default=32, help="query heads (llama-3.2-1b: 32, head dim 64)")
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--reps", type=int, default=20, help="calls per variant in its timed CUDA graph (>= 1)")
    p.add_argument("--out", type=Path, default=None, help="directory for rope_layout.json")
    args = p.parse_args(argv)
    if min(args.n, args.t, args.heads, args.kv_heads, args.head_dim, args.reps) < 1 or args.head_dim % 2:
        p.error("sizes and --reps must be positive, --head-dim even")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("rope_layout: no CUDA device; this benchmark needs a GPU", file=sys.stderr)
        return 2
    dev, dt = torch.device("cuda"), torch.bfloat16
    n, t, h, kv, d = args.n, args.t, args.heads, args.kv_heads, args.head_dim
    qkv = torch.randn(n, t, (h + 2 * kv) * d, device=dev, dtype=dt)
    q, k, _ = qkv.split([h * d, kv * d, kv * d], dim=-1)
    cos, sin = torch.randn(t, d, device=dev, dtype=dt), torch.randn(t, d, device=dev, dtype=dt)
    os.environ[SHAPES_SWITCH] = "dynamic"   # head_major / token_major: the dynamic compile (rows has its column)
    ops = Ops(True, dev, dt)
    if not ops.fused:
        print(f"rope_layout: torch.compile unavailable ({ops.error})", file=sys.stderr)
        return 2
    hm = lambda f: f(q.view(n, t, h, d).transpose(1, 2), k.view(n, t, kv, d).transpose(1, 2),    # noqa: E731
                     cos[None, None], sin[None, None])
    tm = lambda f: f(q.view(n, t, h, d), k.view(n, t, kv, d), cos[None, :, None], sin[None, :, None])  # noqa: E731
    static = torch.compile(rope, dynamic=False, fullgraph=True)
    marked_hd = torch.compile(rope, dynamic=True, fullgraph=True)      # dynamic, but heads and head dim marked static
    marked_hdt = torch.compile(rope, dynamic=True, fullgraph=True)     # ... and the tokens too (n alone dynamic)
    rows_dyn = torch.compile(rope, dynamic=False, fullgraph=True)       # static, but prompts and tokens marked dynamic

    def mark(f, dims):
        def call(qq, kk, cc, ss):
            for x in (qq, kk, cc, ss):
                for dim in dims:
                    if x.shape[dim] > 1:
                        torch._dynamo.mark_static(x, dim)
            return f(qq, kk, cc, ss)
        return call

    def rows_dynamic(*a):                 # as the engine marks them (MODEL_SERVER_FAST_COMPILE_SHAPES=rows)
        mark_rows("rope", a)
        return rows_dyn(*a)
    a, b, c = hm(ops.rope), tm(ops.rope), tm(static)
    kern = lambda: rope_prefill(q.view(n, t, h, d), k.view(n, t, kv, d), cos, sin)      # noqa: E731
    rope_kv.available(d)                                     # imports Triton for the kernel
    same = all(torch.equal(a[i], x[i].transpose(1, 2)) for x in (b, c, kern()) for i in (0, 1))
    eager_same = all(torch.equal(a[0], hm(f)[0]) for f in (rope, static, mark(marked_hd, (1, 3)),
                                                          mark(marked_hdt, (1, 2, 3))))
    moved = 2 * (n * t * (h + kv) * d) * 2                 # q and k read once and written once, bf16
    res = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__, "n": n, "t": t, "heads": h,
           "kv_heads": kv, "head_dim": d, "reps": args.reps, "same_bits_token_vs_head_major": same,
           "compiled_same_as_eager_and_static": eager_same, "bytes_moved": moved, "us": {}, "errors": {}}
    try:                                   # the newest variant: a failure must not cost the call its other numbers
        res["rows_dynamic_same_bits"] = all(torch.equal(x, y) for x, y in zip(a, hm(rows_dynamic)))
    except Exception as exc:  # noqa: BLE001
        res["errors"]["head_major_rows_dynamic"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    for name, fn in (("head_major", lambda: hm(ops.rope)), ("token_major", lambda: tm(ops.rope)),
                     ("head_major_static", lambda: hm(static)), ("token_major_static", lambda: tm(static)),
                     ("head_major_marked_hd", lambda: hm(mark(marked_hd, (1, 3)))),
                     ("head_major_marked_hdt", lambda: hm(mark(marked_hdt, (1, 2, 3)))),
                     ("head_major_rows_dynamic", lambda: hm(rows_dynamic)),
                     ("triton_kernel", kern),
                     ("eager_head_major", lambda: hm(rope)), ("copy_q_k", lambda: (q.clone(), k.clone()))):
        if name in res["errors"]:
            continue
        try:
            res["us"][name] = graph_us(fn, calls=args.reps)   # device time: the calls in one CUDA graph
        except Exception as exc:  # noqa: BLE001 - keep the other variants' numbers
            res["errors"][name] = f"{type(exc).__name__}: {str(exc)[:300]}"
    res["gb_per_s"] = {k2: round(moved / v / 1e3, 1) for k2, v in res["us"].items()}
    text = json.dumps(res, indent=1)
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "rope_layout.json").write_text(text + "\n")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
