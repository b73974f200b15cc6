"""The mma kernel's Nsight Compute report as one table row per profiled configuration (docs/benchmarks.md).

Reads what ``bash benchmarks/gpu_calls.sh mmaprof`` brings back: ``mma_prof.txt`` (``ncu --import ... --page
details``) and ``mmaprof.log`` (``int4_mma_bench.py --once``: one ``once:`` line per configuration, each launched
twice). Per configuration, from its second launch: duration, SM active cycles over elapsed cycles, achieved occupancy,
warp cycles per issued instruction, eligible warps per scheduler, DRAM and L2 throughput, and two derived figures:
executed instructions per tensor-core MMA (``instructions / (n x k x M / (16 x 8 x 16))``, one m16n8k16 per 16 x 8 x 16
multiply-adds) and MMAs per cycle per SM (``MMAs / (SMs x elapsed cycles)``).

  python3 benchmarks/int4_mma_ncu_table.py benchmarks/results/2026-12-06-h100/mmaprof_0033
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path


def metric(block: str, name: str) -> float | None:
    """The value of ncu's ``name`` row in one kernel's block of the details page (None where it has none)."""
    m = re.search(r"\n\s+" + re.escape(name) + r"\s+\S*\s+([\d,.]+)\n", block)
    return float(m.group(1).replace(",", "")) if m else None


def rows(details: str, log: str, launches: int = 2) -> list[str]:
    """One markdown row per ``once:`` line of ``log``, from the last of its ``launches`` kernels in ``details``."""
    blocks = re.split(r"\n  void ", details)[1:]
    runs = [line.split(maxsplit=4) for line in log.splitlines() if line.startswith("once:")]
    if len(blocks) != launches * len(runs):
        raise ValueError(f"{len(blocks)} kernels in the report for {len(runs)} configurations x {launches} launches")
    out = []
    for i, (_, shape, nk, mm, cfg) in enumerate(runs):
        b = blocks[launches * i + launches - 1]
        n, k = map(int, nk.split("x"))
        mmas = n * k * int(mm.removeprefix("M=")) / (16 * 8 * 16)
        grid = re.search(r"\((\d+), (\d+), \d+\)x\(", b)
        v = {name: metric(b, name) for name in (
            "Duration", "SM Active Cycles", "Elapsed Cycles", "Achieved Occupancy", "Warp Cycles Per Issued Instruction",
            "Eligible Warps Per Scheduler", "DRAM Throughput", "L2 Cache Throughput", "Executed Instructions", "# SMs")}
        if None in v.values() or grid is None:
            raise ValueError(f"kernel {launches * i + launches} ({shape} {cfg}) lacks a metric: "
                             f"{[name for name, x in v.items() if x is None]}")
        out.append(f"| {shape} {nk} | {cfg.removeprefix('Config(').rstrip(')')} | {grid.group(1)}x{grid.group(2)} | "
                   f"{v['Duration']:.1f} | {100 * v['SM Active Cycles'] / v['Elapsed Cycles']:.0f} % | "
                   f"{v['Achieved Occupancy']:.1f} % | {v['Warp Cycles Per Issued Instruction']:.1f} | "
                   f"{v['Eligible Warps Per Scheduler']:.2f} | {v['DRAM Throughput']:.1f} | "
                   f"{v['L2 Cache Throughput']:.1f} | {v['Executed Instructions'] / mmas:.1f} | "
                   f"{mmas / (v['# SMs'] * v['Elapsed Cycles']):.3f} |")
    return out


def main(argv: list[str] | None = None) -> int:
    head, rest = __doc__.split("\n\n", 1)
    p = argparse.ArgumentParser(description=head, formatter_class=argparse.RawDescriptionHelpFormatter, epilog=rest)
    p.add_argument("folder", type=Path, help="a mmaprof result folder (mma_prof.txt and mmaprof.log)")
    args = p.parse_args(argv)
    try:
        body = rows((args.folder / "mma_prof.txt").read_text(), (args.folder / "mmaprof.log").read_text())
    except (OSError, ValueError) as exc:
        print(f"int4_mma_ncu_table: {exc}", file=sys.stderr)
        return 2
    print("| shape | configuration | grid | us | SM active / elapsed cycles | achieved occupancy | warp cycles per issued "
          "instruction | eligible warps per scheduler | DRAM % | L2 % | executed instructions per MMA | MMAs per cycle "
          "per SM |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    print("\n".join(body))
    return 0


if __name__ == "__main__":
    sys.exit(main())
