"""benchmarks/dp_greedy_compare.py: the token comparison of gpu_calls.sh's switch A/Bs (splitsum, glu, fuse64), on
decode-profile reports made here (the keys decode_profile.py writes: variant, greedy_tokens, greedy_batch_tokens)."""
from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from dp_greedy_compare import compare  # noqa: E402


def _row(variant: str, seed: int, flip: int | None = None) -> dict:
    rng = random.Random(seed)
    one = [rng.randrange(5, 1000) for _ in range(16)]
    batch = [[rng.randrange(5, 1000) for _ in range(8)] for _ in range(4)]
    if flip is not None:
        one[flip] += 1
        batch[flip % 4][0] += 1
    return {"quant": "int4", "variant": variant, "greedy_tokens": one, "greedy_batch_tokens": batch}


def test_identical_runs_and_the_rotary_kernel_against_separate_ops():
    off = {"rows": [_row("rope-kv-off", 1), _row("served", 1)]}
    on = {"rows": [_row("served", 1)]}
    lines, ok = compare(off, on)
    assert ok and lines == [
        "served, off vs on: one request identical (16 tokens); concurrent requests identical (32 tokens)",
        "rotary + K/V kernel (served) vs separate ops (off): one request identical (16 tokens); "
        "concurrent requests identical (32 tokens)"]


def test_differences_are_located():
    lines, ok = compare({"rows": [_row("served", 1)]}, {"rows": [_row("served", 1, flip=5)]})
    assert ok and lines == ["served, off vs on: one request differ from token 5; concurrent requests 1 of 4 requests "
                            "differ"]


def test_a_missing_or_failed_row_is_not_read_as_identical(tmp_path):
    lines, ok = compare({"rows": [{"quant": "int4", "variant": "served", "error": "RuntimeError: boom"}]},
                        {"rows": [_row("served", 1)]})
    assert not ok and lines == ["served row (off): RuntimeError: boom"]
    lines, ok = compare({"rows": [_row("rope-kv-off", 1)]}, {"rows": []})
    assert not ok and "served row (off): missing" in lines and "served row (on): missing" in lines
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"rows": [_row("served", 2)]}))
    script = [sys.executable, str(ROOT / "benchmarks" / "dp_greedy_compare.py")]
    r = subprocess.run(script + [str(good), str(tmp_path / "absent.json")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and r.stderr.startswith("dp_greedy_compare: ") and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = subprocess.run(script + [str(good), str(good)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "identical" in r.stdout
