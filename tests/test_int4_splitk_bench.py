"""benchmarks/int4_splitk_bench.py (the split-K reduction's GPU A/B) on the CPU: its arguments, the timing order, the
correctness check (run in Triton's interpreter on small linears), the per-step sums and the table; and
benchmarks/gpu_calls.sh's ``splitk`` mode, run with stand-ins for python3 and nvidia-smi that record each call."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import int4_splitk_bench as bench  # noqa: E402
from model_server import int4_triton, int4_triton_split  # noqa: E402
from model_server.int4_quant import dequantize_groupwise, quantize_groupwise  # noqa: E402


def test_arguments():
    args = bench.parse_args([])
    assert args.ms == [16, 32, 64] and args.check_rows == 64 and args.shapes == list(bench.SHAPES)
    assert bench.SHAPES == {"qkv_proj": (3072, 2048), "o_proj": (2048, 2048), "gate_up_proj": (16384, 2048),
                            "down_proj": (2048, 8192), "lm_head": (128256, 2048)}
    assert bench.parse_args(["--ms", "1,64", "--shapes", "o_proj"]).shapes == ["o_proj"]
    for bad in (["--ms", "0"], ["--shapes", "up_proj"], ["--rounds", "0"], ["--check-rows", "-1"]):
        with pytest.raises(SystemExit) as err:
            bench.parse_args(bad)
        assert err.value.code == 2


def test_rounds_alternate_so_drift_cancels():
    assert bench.order(1) == ["kernel", "ticket"]
    assert bench.order(3) == ["kernel", "ticket", "ticket", "kernel", "kernel", "ticket"]


def test_check_runs_both_reductions_against_the_reference(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert int4_triton.available()
    torch.manual_seed(0)
    weights = {}
    for name, (n, k) in {"a": (80, 512), "b": (64, 1024)}.items():
        q, sz = quantize_groupwise(torch.randn(n, k) * 0.05, 64)
        weights[name] = ((int4_triton.pack_int4(q, 64), *int4_triton.split_scales_and_zeros(sz)),
                         dequantize_groupwise(q, sz, 64).float())
    res = bench.check(weights, [1, 5], 64, torch.float32)
    assert res["ok"] and res["identical"] and res["cells"] == 4 and not res["failures"]
    assert any(c["split_k"] > 1 for c in res["rows"])          # the interpreter's 8 "SMs": these steps split K
    assert 0 < res["max_rel_err"]["ticket"] < 1e-5 and 0 < res["max_rel_err"]["kernel"] < 1e-5
    assert not int4_triton_split.counters(torch.device("cpu"), 0).any()


def _fake_result() -> dict:
    """Cells in the shape run() makes, with made-up times (the arithmetic of the table is what is checked)."""
    cells = []
    for i, (name, (n, k)) in enumerate(bench.SHAPES.items()):
        cells.append({"name": name, "n": n, "k": k, "m": 64, "config": {"split_k": 2 if n < 4096 else 1},
                      "graph_us": {"kernel": [10.0 + i, 9.0 + i], "ticket": [8.0 + i, 8.5 + i]},
                      "eager_us": {"kernel": [30.0, 31.0], "ticket": [20.0, 21.0]}})
    cells.append(dict(cells[0], m=32, counters_zero=False))        # a row count not every linear has: no step sum
    check = {"ok": False, "rows": 64, "per_shape": {"o_proj": {
        "max_rel_err": {"ticket": 2e-3, "kernel": 2e-3}, "identical": False, "ok": False,
        "failures": [{"m": 7}]}}}
    return {"card": "test card", "commit": "abc", "command": "benchmarks/int4_splitk_bench.py", "reps": 5,
            "rounds": 2, "cells": cells, "steps": bench.steps(cells, [64, 32]), "check": check}


def test_steps_sum_a_decode_step_and_the_table_shows_the_fastest_round():
    res = _fake_result()
    assert list(res["steps"]) == ["64"]
    want = {mode: sum((16 if c["name"] != "lm_head" else 1) * min(c["graph_us"][mode]) for c in res["cells"][:5])
            for mode in bench.MODES}
    assert res["steps"]["64"] == pytest.approx(want)
    md = bench.markdown(res)
    assert "| qkv_proj | 3072 x 2048 | 64 | 2 | 9.00 (30.0) | 8.00 (20.0) | -1.00 |" in md
    assert f"| 64 | {want['kernel']:.1f} | {want['ticket']:.1f} |" in md
    assert "failing M: 7" in md and "counters not back at zero after qkv_proj M=32" in md


def test_main_without_a_gpu_is_one_line_and_exit_2():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    r = subprocess.run([sys.executable, "benchmarks/int4_splitk_bench.py", "--ms", "16"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip() == "int4_splitk_bench: no CUDA device; this benchmark needs a GPU"


STUB = """#!/usr/bin/env bash
echo "${MODEL_SERVER_INT4_TRITON_SPLIT_REDUCE:-unset}|$*" >> "$CALLS"
case "$*" in
  *int4_splitk_bench.py*) echo "# INT4 Triton GEMM, split-K reduction: stub table" ;;
  *steady_state.py*) echo "int4:mma c= 64   1.0 tok/s [1.0..1.0] stub" ;;
esac
exit 0
"""


def _run_mode(tmp_path: Path, **env: str) -> tuple[subprocess.CompletedProcess, list[tuple[str, str]]]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("python3", STUB), ("nvidia-smi", "#!/usr/bin/env bash\necho stub card\n")):
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    out, calls = tmp_path / "OUT", tmp_path / "calls.txt"
    out.mkdir()                                                    # the device tool makes $OUT
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MODEL_SERVER_", "SS_"))}
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_calls.sh"), "splitk"], cwd=tmp_path,
                       env={**base, "PATH": f"{bin_dir}:{base['PATH']}", "OUT": str(out), "CALLS": str(calls),
                            "EDGE_EVAL_COMMIT": "c0ffee", **env}, capture_output=True, text=True, timeout=60)
    lines = [tuple(line.split("|", 1)) for line in calls.read_text().splitlines()]
    return r, [(e, a) for e, a in lines if "pip install" not in a and "model_server synth" not in a]


def test_gpu_calls_splitk_runs_the_kernels_then_ticket_then_kernel(tmp_path):
    r, calls = _run_mode(tmp_path)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "OUT"
    assert [a.split()[0] for _, a in calls] == ["benchmarks/int4_splitk_bench.py", "benchmarks/steady_state.py",
                                                "benchmarks/steady_state.py"]
    (_, kernels), (arm1, ss1), (arm2, ss2) = calls
    assert f"--commit c0ffee --out {out}/splitk" in kernels
    assert (arm1, arm2) == ("ticket", "kernel")
    for arm, args in ((arm1, ss1), (arm2, ss2)):
        assert f"--out {out}/ss_{arm} " in args and "--quants int4:mma --concurrency 64,32" in args
        assert "--http-concurrency" in args and "--commit c0ffee" in args
    assert "int4_splitk_bench rc 0" in r.stdout and "stub table" in r.stdout
    assert "steady_state (ss_ticket) rc 0" in r.stdout and "steady_state (ss_kernel) rc 0" in r.stdout


def test_gpu_calls_splitk_takes_the_steady_state_settings(tmp_path):
    r, calls = _run_mode(tmp_path, SS_CONC="32", SS_QUANTS="int4:triton")
    assert r.returncode == 0, r.stderr
    assert all("--quants int4:triton --concurrency 32 " in a for _, a in calls[1:]) and len(calls) == 3


def test_gpu_calls_lists_splitk_and_parses():
    body = (ROOT / "benchmarks" / "gpu_calls.sh").read_text()
    assert "bash benchmarks/gpu_calls.sh splitk" in body            # the usage comment
    head = body.split('case "${1:-}" in', 2)
    line = head[1].split("\n")[0]
    accepted = line.split(")")[0].strip().split("|")
    usage = line.split("usage: bash benchmarks/gpu_calls.sh ")[1].split('"')[0].split("|")
    assert "splitk" in accepted and accepted == usage                # every mode it takes, its usage line names
    branches = {m for label in re.findall(r"\n  ([a-z0-9|]+)\)", head[2]) for m in label.split("|")}
    assert set(accepted) == branches                                 # ... and each has a branch
    assert subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu_calls.sh")]).returncode == 0


def test_run_end_to_end_with_cpu_stand_ins(monkeypatch, tmp_path):
    """run() and main() with the GPU parts replaced: small linears built on the CPU, the interpreter's kernels, a
    timer that calls each launch once; the JSON holds every cell, the step sums, the check, card and command."""
    import json
    from types import SimpleNamespace

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert int4_triton.available()
    small = {"qkv_proj": (96, 512), "o_proj": (64, 512), "gate_up_proj": (128, 512), "down_proj": (64, 1024),
             "lm_head": (256, 512)}
    monkeypatch.setattr(bench, "SHAPES", small)
    monkeypatch.setattr(bench, "MERGED", {s: small[s] for s in small if s != "lm_head"})

    class CpuShape:
        def __init__(self, n, k, group, l2, l2_multiple, methods):
            self.q, self.sz = quantize_groupwise(torch.randn(n, k) * 0.05, group)
            self.copies = {"triton": [(int4_triton.pack_int4(self.q, group),
                                       *int4_triton.split_scales_and_zeros(self.sz))]}

    timed: list[str] = []

    def fake_time(calls, reps):
        for c in calls:
            c()
        timed.append("x")
        return 2.0, 1.0

    monkeypatch.setattr(bench, "Shape", CpuShape)
    monkeypatch.setattr(bench, "time_calls", fake_time)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: SimpleNamespace(
        name="stand-in", multi_processor_count=8, L2_cache_size=1 << 20))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(bench, "DEVICE", "cpu")
    monkeypatch.setattr(bench, "DTYPE", torch.float32)                # the interpreter cannot run bf16
    rc = bench.main(["--ms", "1,3", "--check-rows", "2", "--rounds", "1", "--out", str(tmp_path), "--commit", "c1"])
    res = json.loads((tmp_path / "int4_splitk.json").read_text())
    assert rc == 0 and res["check"]["ok"] and res["card"] == "stand-in" and res["commit"] == "c1"
    assert res["command"].startswith("benchmarks/int4_splitk_bench.py")
    assert len(res["cells"]) == 10 and len(timed) == 20 and all(c["counters_zero"] for c in res["cells"])
    assert set(res["steps"]) == {"1", "3"} and set(res["check"]["per_shape"]) == set(small)
    assert (tmp_path / "int4_splitk.md").read_text().startswith("# INT4 Triton GEMM, split-K reduction")
