"""Two decode-profile runs (``benchmarks/decode_profile.py --batch-greedy N``) of one A/B, compared by their tokens.

``gpu_calls.sh``'s switch A/Bs (``splitsum``, ``glu``, ``fuse64``) run the profile once with the switches off and once
on. This prints whether the ``served`` rows of the two give the same greedy tokens (one request alone, and ``N``
concurrent requests: decode steps of ``N`` rows), and, where the first run also has a ``rope-kv-off`` row (decode's
rotary + K/V writes as separate ops), whether the served rotary + K/V kernel gives that row's tokens. Exits 1 when a
row is missing or errored, so a broken run is not read as "identical".

  python3 benchmarks/dp_greedy_compare.py OFF/decode_profile.json ON/decode_profile.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _row(rows: list[dict], variant: str) -> dict | None:
    return next((r for r in rows if r.get("variant") == variant), None)


def _same(a: dict, b: dict, key: str) -> str:
    ta, tb = a.get(key), b.get(key)
    if ta is None or tb is None:
        return "not recorded"
    if ta == tb:
        return f"identical ({sum(map(len, ta)) if ta and isinstance(ta[0], list) else len(ta)} tokens)"
    if ta and isinstance(ta[0], list):
        return f"{sum(x != y for x, y in zip(ta, tb))} of {len(ta)} requests differ"
    return f"differ from token {next((i for i, (x, y) in enumerate(zip(ta, tb)) if x != y), min(len(ta), len(tb)))}"


def compare(off: dict, on: dict) -> tuple[list[str], bool]:
    """Lines to print, and whether every row needed was there without an error."""
    lines, ok = [], True
    a, b = _row(off["rows"], "served"), _row(on["rows"], "served")
    for name, row in (("off", a), ("on", b)):
        if row is None or "error" in row:
            lines.append(f"served row ({name}): {'missing' if row is None else row['error']}")
            ok = False
    if ok:
        lines.append(f"served, off vs on: one request {_same(a, b, 'greedy_tokens')}; "
                     f"concurrent requests {_same(a, b, 'greedy_batch_tokens')}")
    ref = _row(off["rows"], "rope-kv-off")
    if ref is not None:
        if "error" in ref or a is None or "error" in a:
            lines.append(f"rope-kv-off row: {ref.get('error', 'no served row to compare')}")
            ok = False
        else:
            lines.append(f"rotary + K/V kernel (served) vs separate ops (off): one request "
                         f"{_same(ref, a, 'greedy_tokens')}; concurrent requests "
                         f"{_same(ref, a, 'greedy_batch_tokens')}")
    return lines, ok


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("off", type=Path, help="decode_profile.json with the switches off")
    ap.add_argument("on", type=Path, help="decode_profile.json with the switches on")
    args = ap.parse_args(argv)
    try:
        off, on = (json.loads(p.read_text()) for p in (args.off, args.on))
    except (OSError, ValueError) as exc:
        print(f"dp_greedy_compare: {exc}", file=sys.stderr)
        return 1
    lines, ok = compare(off, on)
    print("\n".join(lines))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
