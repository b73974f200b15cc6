"""The arithmetic docs/benchmarks.md does on steady-state and prefill-burst results (issue 17), as a command.

In the in-process steady state every stream asks for ``new_tokens`` tokens, so at concurrency ``c`` the streams finish
together and resubmit: a *wave* is ``c * new_tokens`` tokens, and the time it takes beyond ``new_tokens`` steps at
the median inter-token latency is the wave's stall (its prefill and whatever else the steps wait for)::

    stall_ms = c * new_tokens / tokens_per_s * 1000 - new_tokens * itl_p50_ms

For ``prefill_burst.py`` results: the largest burst's median wall time; with ``--profile`` also that less its profiled
kernel time, i.e. the time the device did not spend in kernels (host-bound when large)::

    host_ms = ms_median(largest burst) - kernel_ms_per_step(profile)

  python benchmarks/wave_stall.py benchmarks/results/2026-12-06-h100/fuse64_1855/ss_on1/steady_state.json
  python benchmarks/wave_stall.py benchmarks/results/2026-12-06-h100/wave_1924/b/prefill_burst.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def stall_ms(concurrency: int, new_tokens: int, tokens_per_s: float, itl_p50_ms: float) -> float:
    """A wave's stall (module docstring), ms."""
    return concurrency * new_tokens / tokens_per_s * 1e3 - new_tokens * itl_p50_ms


def lines(doc: dict) -> list[str]:
    """One line per format (and concurrency) of a steady_state.json or prefill_burst.json document."""
    out = []
    for q in doc.get("quants", []):
        cells = q.get("cells") or []
        if cells and "itl_p50_ms" in cells[0]:                           # steady_state.py
            for c in cells:
                s = stall_ms(c["concurrency"], doc["new_tokens"], c["tokens_per_second_median"], c["itl_p50_ms"])
                out.append(f"{q['quant']} c={c['concurrency']}: wave {c['concurrency'] * doc['new_tokens']} tokens, "
                           f"stall {s:.1f} ms")
        elif cells:                                                      # prefill_burst.py
            top = max(cells, key=lambda c: c["prompts"])
            line = f"{q['quant']} burst of {top['prompts']}: {top['ms_median']:.1f} ms"
            if q.get("profile"):                                         # --profile: kernel time of that burst
                kern = q["profile"]["kernel_ms_per_step"]
                line += f", kernels {kern:.1f} ms, host {top['ms_median'] - kern:.1f} ms"
            out.append(line)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("files", nargs="+", help="steady_state.json or prefill_burst.json files")
    args = ap.parse_args(argv)
    for f in args.files:
        try:
            found = lines(json.loads(Path(f).read_text()))
        except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError) as e:
            print(f"wave_stall: {f}: cannot read it ({type(e).__name__}: {e})", file=sys.stderr)
            return 2
        if not found:
            print(f"wave_stall: {f}: no steady-state cells or bursts in it", file=sys.stderr)
            return 2
        print(f"{f}:")
        for line in found:
            print(f"  {line}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
