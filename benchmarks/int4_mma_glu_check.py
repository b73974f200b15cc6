"""The mma kernel's GLU epilogue (model_server/int4_mma_glu.py) on a GPU: its first-use check, then per row count on
the 1B preset's merged gate/up (16,384 x 2,048, group 128, random 4-bit weights) the epilogue against the plain
kernel followed by the separate SiLU-mul (as the MLP runs them without it): the largest difference in bf16 units in
the last place of the reference's largest output, how many outputs differ, and device microseconds per call of each
in a CUDA graph (the same launches the decode graphs hold).

    python benchmarks/int4_mma_glu_check.py --out out/glu [--rows 1,2,4,8,16,32]

Writes ``int4_mma_glu_check.json`` (card, commit, check result, one row per row count) and prints a table. Needs CUDA.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gemv_probe import graph_us  # noqa: E402
from support import default_commit, utc_date  # noqa: E402

from model_server import int4_mma, int4_mma_glu  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder for int4_mma_glu_check.json")
    ap.add_argument("--rows", default="1,2,4,8,16,32", help="row counts (1-32; default 1,2,4,8,16,32)")
    ap.add_argument("--n", type=int, default=16384, help="merged gate/up outputs 2 I (default 16384)")
    ap.add_argument("--k", type=int, default=2048, help="inputs (default 2048)")
    ap.add_argument("--commit", default=default_commit())
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("int4_mma_glu_check: needs CUDA", file=sys.stderr)
        return 2
    try:
        rows = [int(r) for r in args.rows.split(",") if r.strip()]
    except ValueError:
        ap.error(f"--rows must be integers, got {args.rows!r}")
    dev = torch.device("cuda")
    why = int4_mma_glu.check(dev)
    gen = torch.Generator().manual_seed(0)
    n, k, group = args.n, args.k, 128
    words, scales = int4_mma_glu.random_layer(n, k, group, gen, dev)
    int4_mma.reserve(dev, n, k)
    sms = int4_mma._num_sms(dev)
    out: list[dict] = []
    for m in rows:
        x = torch.randn(m, k, generator=gen).to(dev, torch.bfloat16)
        cfg = int4_mma_glu.glu_config(m, n, k, sms)

        def plain() -> torch.Tensor:
            y = int4_mma.int4_mma_mm(x, words, scales, group)
            return F.silu(y[:, : n // 2]) * y[:, n // 2:]

        def fused() -> torch.Tensor | None:
            return int4_mma_glu.int4_mma_glu(x, words, scales, group)

        ref, got = plain(), fused()
        row: dict = {"rows": m, "config": None if cfg is None else cfg.name(),
                     "plain_config": int4_mma.choose_config(m, n, k, sms).name()}
        if got is not None:
            ulp = 2.0 ** -8 * float(ref.float().abs().max())
            diff = (got.float() - ref.float()).abs()
            row.update(max_ulps=round(float(diff.max()) / ulp, 3), outputs_differing=int((diff > 0).sum()),
                       outputs=got.numel(), plain_us=graph_us(plain), glu_us=graph_us(fused))
            row["saved_us"] = round(row["plain_us"] - row["glu_us"], 2)
        out.append(row)
    report = {"card": torch.cuda.get_device_name(dev), "date": utc_date("%Y-%m-%d %H:%M"), "commit": args.commit,
              "command": "python benchmarks/int4_mma_glu_check.py " + " ".join(sys.argv[1:]), "shape": [n, k],
              "group": group, "check": why or "passed", "rows": out}
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "int4_mma_glu_check.json").write_text(json.dumps(report, indent=1) + "\n")
    print(f"{report['card']}, commit {args.commit}; first-use check: {report['check']}")
    print("| rows | GLU config | plain + SiLU-mul us | GLU us | saved us | max ulps | outputs differing |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for r in out:
        print(f"| {r['rows']} | {r['config']} | {r.get('plain_us', '-')} | {r.get('glu_us', '-')} | "
              f"{r.get('saved_us', '-')} | {r.get('max_ulps', '-')} | {r.get('outputs_differing', '-')} / "
              f"{r.get('outputs', '-')} |")
    return 0 if why is None else 1


if __name__ == "__main__":
    sys.exit(main())
