"""GPU A/B of prefetching the next INT4 linear's weights into L2 (``model_server/l2_prefetch.py``).

Per rows M (--ms): the 16 decoder layers of the llama-3.2-1b preset's linears as the fast engine serves them
(merged q/k/v, o, merged gate/up, down: :class:`model_server.int4.Int4Linear` with this device's kernel choice and
random 4-bit weights), called in a step's order in one CUDA graph. Arms:

* ``off``: no prefetch (served today);
* ``inline``: each linear launches the prefetch of the next one's weights on the step's stream first;
* ``side``: the same launch on a side stream forked before the linear and joined after it;
* ``hot``: every layer calls layer 0's linears (30 MB of weights stay in L2): what L2-resident weights would give;
* ``bf16``: the same shapes as bf16 ``F.linear`` (cuBLAS), for the ratio.

Median CUDA-graph replay time per step (64 linears) over --reps replays, --rounds rounds in alternating order; every
round is kept. Check: each prefetch arm's outputs equal ``off``'s bit for bit (a prefetch moves no data a kernel
sees); exit 1 otherwise. Writes int4_l2_prefetch.json / .md to --out (card, commit, command).

  python3 benchmarks/int4_l2_prefetch.py --out DIR --commit SHA   # exits 2 (one line) without a CUDA device
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from model_server import l2_prefetch  # noqa: E402
from model_server.int4 import Int4Linear  # noqa: E402
from model_server.int4_choice import device_compute  # noqa: E402
from support import command_line, default_commit  # noqa: E402

SHAPES = (("qkv_proj", 3072, 2048), ("o_proj", 2048, 2048), ("gate_up_proj", 16384, 2048), ("down_proj", 2048, 8192))
LAYERS, GROUP = 16, 128
ARMS = ("off", "inline", "side", "hot", "bf16")


def int4_layers(n_layers: int, device: str) -> list[list[Int4Linear]]:
    choice = device_compute(device)
    gen = torch.Generator(device=device).manual_seed(0)
    layers = []
    for _ in range(n_layers):
        mods = []
        for _, n, k in SHAPES:
            q = torch.randint(0, 16, (n, k), generator=gen, device=device, dtype=torch.uint8)
            sz = torch.empty((k // GROUP, n, 2), device=device, dtype=torch.bfloat16)
            sz[..., 0].uniform_(0.002, 0.02, generator=gen)
            sz[..., 1].uniform_(-0.01, 0.01, generator=gen)
            mods.append(Int4Linear.from_quantized(q, sz, GROUP, choice))
        layers.append(mods)
    return layers


def chain(layers: list[list[Int4Linear]], how: str | None) -> None:
    """Link (or unlink, ``how`` None) the linears in step order, as ``factory.install_l2_prefetch`` does."""
    l2_prefetch.link([m for mods in layers for m in mods], how)


def step_fn(layers: list[list[Callable]], xs: tuple[torch.Tensor, torch.Tensor]) -> Callable[[], list[torch.Tensor]]:
    x, x_wide = xs

    def step() -> list[torch.Tensor]:
        out = []
        for qkv, o, gate_up, down in layers:
            out += [qkv(x), o(x), gate_up(x), down(x_wide)]
        return out
    return step


def graph_time(step: Callable[[], list[torch.Tensor]], reps: int) -> tuple[float, list[torch.Tensor]]:
    """(median replay ms, the graph's outputs after the timed replays)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        outs = step()
    for _ in range(3):
        g.replay()
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for a, b in ev:
        a.record()
        g.replay()
        b.record()
    torch.cuda.synchronize()
    ms = statistics.median(a.elapsed_time(b) for a, b in ev)
    res = [t.clone() for t in outs]
    del g
    return ms, res


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="directory for int4_l2_prefetch.json / .md")
    p.add_argument("--commit", default=None, help="commit of the code measured (default: git HEAD)")
    p.add_argument("--ms", default="1,8,16,32,64", help="rows M (comma-separated, 1..64)")
    p.add_argument("--reps", type=int, default=50, help="timed graph replays per arm and round")
    p.add_argument("--rounds", type=int, default=3, help="rounds (arm order alternates)")
    p.add_argument("--arms", default=",".join(ARMS), help="arms to time (off is always timed)")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("int4_l2_prefetch: needs a CUDA device", file=sys.stderr)
        return 2
    if not l2_prefetch.usable(torch.cuda.current_device()):
        print("int4_l2_prefetch: needs compute capability >= 9.0 and Triton", file=sys.stderr)
        return 2
    ms = [int(v) for v in args.ms.split(",") if v.strip()]
    arms = ["off"] + [a for a in args.arms.split(",") if a in ARMS and a != "off"]
    dev = "cuda"
    layers = int4_layers(LAYERS, dev)
    hot = [layers[0]] * LAYERS
    bf16 = [[(lambda w: (lambda x: F.linear(x, w)))(torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02)
             for _, n, k in SHAPES] for _ in range(LAYERS)] if "bf16" in arms else []
    props = torch.cuda.get_device_properties(0)
    result: dict = {"card": props.name, "l2_bytes": getattr(props, "L2_cache_size", None), "commit": args.commit or
                    default_commit(), "command": command_line("python3 benchmarks/int4_l2_prefetch.py"), "kernel_choice": layers[0][0].kernel, "cells": []}
    bad = 0
    for m in ms:
        gen = torch.Generator(device=dev).manual_seed(m)
        xs = (torch.randn(m, 2048, device=dev, dtype=torch.bfloat16, generator=gen),
              torch.randn(m, 8192, device=dev, dtype=torch.bfloat16, generator=gen))
        times: dict[str, list[float]] = {a: [] for a in arms}
        ref = None
        for rnd in range(args.rounds):
            for arm in (arms if rnd % 2 == 0 else arms[::-1]):
                chain(layers, arm if arm in ("inline", "side") else None)
                mods = hot if arm == "hot" else bf16 if arm == "bf16" else layers
                ms_step, outs = graph_time(step_fn(mods, xs), args.reps)
                times[arm].append(ms_step * 1e3)
                if arm == "off" and ref is None:
                    ref = outs
                elif arm in ("inline", "side") and ref is not None:
                    same = all(torch.equal(a, b) for a, b in zip(ref, outs))
                    if not same:
                        bad += 1
                        print(f"M={m} {arm}: outputs differ from off", file=sys.stderr)
        chain(layers, None)
        cell = {"m": m, "us_per_step": {a: min(v) for a, v in times.items()}, "rounds_us": times}
        result["cells"].append(cell)
        off = cell["us_per_step"]["off"]
        print(f"M={m:3d} " + "  ".join(f"{a} {v:8.1f} us ({v / off:.3f})" for a, v in cell["us_per_step"].items()),
              flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "int4_l2_prefetch.json").write_text(json.dumps(result, indent=1))
    lines = [f"# INT4 linears of 16 layers per step, L2 prefetch A/B ({props.name}, commit {result['commit']})", "",
             "| rows | " + " | ".join(f"{a} us" for a in arms) + " | " + " | ".join(f"{a} / off" for a in arms[1:])
             + " |", "|---:|" + "---:|" * (2 * len(arms) - 1)]
    for c in result["cells"]:
        u = c["us_per_step"]
        lines.append(f"| {c['m']} | " + " | ".join(f"{u[a]:.1f}" for a in arms) + " | "
                     + " | ".join(f"{u[a] / u['off']:.3f}" for a in arms[1:]) + " |")
    (args.out / "int4_l2_prefetch.md").write_text("\n".join(lines) + "\n")
    print("check: " + ("ok" if not bad else f"{bad} arm(s) differ"))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
