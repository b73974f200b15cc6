"""Reading a checkpoint onto the device: safetensors' ``load_file`` vs model_server.staged_read (issue 17).

A cold start's kernel pre-warm waits for the weights to be on the device (docs/benchmarks.md, the cold-start
phases' ``read``: 1.0-1.4 s for the 1B preset's 2.5 GB on an H100). This times both readers on the same file,
alternating (``--reps`` each, the file in the page cache after a first untimed read), checks that both give
the same tensors, and writes ``read_weights.json`` and a table under ``--out``.

GPU: ``python benchmarks/read_weights.py --model-dir /tmp/m1b --device cuda``; CPU:
``python benchmarks/read_weights.py --model-dir M --device cpu``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from support import command_line, default_commit, log, utc_date  # noqa: E402

from model_server.staged_read import CHUNK_BYTES, read_file  # noqa: E402


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str) -> tuple[float, dict[str, torch.Tensor]]:
    _sync(device)
    t = time.perf_counter()
    out = fn()
    _sync(device)
    return time.perf_counter() - t, out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", required=True, help="a folder with model.safetensors")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--chunk-mb", type=int, default=CHUNK_BYTES >> 20)
    ap.add_argument("--commit", default=default_commit())
    ap.add_argument("--out", default="out/read_weights")
    args = ap.parse_args(argv)
    path = Path(args.model_dir) / "model.safetensors"
    if not path.is_file():
        ap.error(f"{path} does not exist")
    if args.reps < 1 or args.chunk_mb < 1:
        ap.error("--reps and --chunk-mb must be positive")
    if args.device == "cuda":
        torch.empty(1, device="cuda")                      # the context, outside the timings
    readers = {"load_file": lambda: load_file(str(path), device=args.device),
               "staged": lambda: read_file(path, args.device, args.chunk_mb << 20)}
    size = path.stat().st_size
    readers["load_file"]()                                # the file into the page cache, both readers warm
    readers["staged"]()
    times: dict[str, list[float]] = {k: [] for k in readers}
    same = True
    for rep in range(args.reps):
        got = {}
        for name, fn in readers.items():
            dt, got[name] = timed(fn, args.device)
            times[name].append(dt)
        a, b = got["load_file"], got["staged"]
        same = same and set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
        del got, a, b
        log(f"rep {rep + 1}: " + ", ".join(f"{k} {v[-1]:.3f} s" for k, v in times.items()))
    med = {k: statistics.median(v) for k, v in times.items()}
    report = {"date": utc_date(), "command": command_line("benchmarks/read_weights.py", argv), "commit": args.commit,
              "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "file_bytes": size,
              "chunk_bytes": args.chunk_mb << 20, "seconds": times, "median_seconds": med,
              "gb_per_s": {k: size / v / 1e9 for k, v in med.items()}, "identical_tensors": same}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "read_weights.json").write_text(json.dumps(report, indent=1) + "\n")
    table = ("| reader | median s | GB/s | reps (s) |\n|---|---|---|---|\n" + "".join(
        f"| {k} | {med[k]:.3f} | {size / med[k] / 1e9:.2f} | {', '.join(f'{x:.3f}' for x in times[k])} |\n"
        for k in readers) + f"\n{size / 1e9:.2f} GB on {report['device']}; staged / load_file time "
        f"{med['staged'] / med['load_file']:.2f}x; identical tensors: {same}\n")
    (out / "read_weights.md").write_text(table)
    print(table)
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
