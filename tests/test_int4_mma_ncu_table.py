"""benchmarks/int4_mma_ncu_table.py: the profile table's rows and derived columns from an ncu details page (written
here in ncu's layout) and the ``--once`` log; a report that does not match the log is a one-line error."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _kernel(duration: float, active: int, elapsed: int, instructions: int) -> str:
    rows = [("Duration", "us", f"{duration}"), ("Elapsed Cycles", "cycle", f"{elapsed:,}"),
            ("SM Active Cycles", "cycle", f"{active:,}"), ("L2 Cache Throughput", "%", "30.00"),
            ("DRAM Throughput", "%", "6.50"), ("Eligible Warps Per Scheduler", "warp", "0.46"),
            ("Warp Cycles Per Issued Instruction", "cycle", "8.50"), ("Executed Instructions", "inst",
                                                                          f"{instructions:,}"),
            ("# SMs", "SM", "132"), ("Achieved Occupancy", "%", "16.50")]
    body = "\n".join(f"    {name:<40} {unit:>11} {value:>12}" for name, unit, value in rows)
    return f"\n  void w4a16_mma<8, 1, 4, 4, 0, 1>(const unsigned short *) (48, 8, 1)x(128, 1, 1), Device 0\n{body}\n"


def test_rows_come_from_each_configurations_second_launch(tmp_path: Path) -> None:
    mmas = 3072 * 2048 * 64 // (16 * 8 * 16)                     # 196,608 m16n8k16 per launch
    (tmp_path / "mma_prof.txt").write_text("[1] python3\n" + _kernel(99.0, 1, 2, 1) + _kernel(16.0, 16_000, 32_000,
                                                                                                13 * mmas))
    (tmp_path / "mmaprof.log").write_text("once: qkv_proj 3072x2048 M=64 Config(nt=8, r=1, warps=4, stages=4, "
                                          "split=8, flat=0, kw=1)\n")
    out = subprocess.run([sys.executable, str(BENCH / "int4_mma_ncu_table.py"), str(tmp_path)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    row = out.stdout.strip().splitlines()[-1].split(" | ")
    assert row[0] == "| qkv_proj 3072x2048" and row[2] == "48x8" and row[3] == "16.0"    # the second launch
    assert row[4] == "50 %" and row[10] == "13.0"                                        # 16,000 / 32,000; 13 per MMA
    assert row[11] == f"{mmas / (132 * 32_000):.3f} |"


def test_a_report_that_does_not_match_the_log_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "mma_prof.txt").write_text(_kernel(16.0, 1, 2, 3))                     # one launch, not two
    (tmp_path / "mmaprof.log").write_text("once: o_proj 2048x2048 M=64 Config(nt=8)\n")
    out = subprocess.run([sys.executable, str(BENCH / "int4_mma_ncu_table.py"), str(tmp_path)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1 and "1 kernels" in out.stderr
