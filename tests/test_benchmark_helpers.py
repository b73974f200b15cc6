"""The GPU write-up helpers in benchmarks/: LoRA/QLoRA ratios, the grid-vs-paper table, the loop-lag summary."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import adapt_energy  # noqa: E402
import energy_load  # noqa: E402


def _run(method: str, dtype: str, joules: float, seconds: float, mem: int) -> dict:
    return {"method": method, "compute_dtype": dtype, "train_joules": joules, "train_seconds": seconds,
            "peak_gpu_memory_bytes": mem, "tokens": 1000}


def test_qlora_lora_ratios_per_dtype_and_failed_runs_left_out() -> None:
    rows = [_run("lora", "bf16", 100.0, 10.0, 4), _run("qlora", "bf16", 150.0, 16.0, 5),
            _run("lora", "fp16", 120.0, 12.0, 4), {"method": "qlora", "compute_dtype": "fp16", "error": "x"}]
    (bf16,) = adapt_energy.ratios(rows)              # fp16 has no successful QLoRA run
    assert bf16["compute_dtype"] == "bf16" and bf16["same_tokens"]
    assert (bf16["energy_ratio"], bf16["time_ratio"], bf16["memory_ratio"]) == (1.5, 1.6, 1.25)


def test_loop_lag_summary_counts_late_runs_and_the_worst_bucket() -> None:
    buckets = {"0.001": 10.0, "0.05": 15.0, "0.1": 15.0, "0.5": 18.0, "1.0": 18.0, "+Inf": 18.0}
    s = energy_load.lag_summary(buckets)
    assert s == {"loop_lag_runs": 18.0, "loop_lag_over_50ms": 3.0, "loop_lag_max_bucket_seconds": 0.5}
    assert energy_load.lag_summary({})["loop_lag_over_50ms"] is None


def test_gc_pause_buckets_are_summed_over_generations() -> None:
    text = "".join(
        f'edge_proxy_gc_pause_seconds_bucket{{generation="{g}",le="{le}"}} {n}\n'
        for g, counts in (("0", (5, 5, 5)), ("2", (0, 1, 2)))
        for le, n in zip(("0.05", "0.25", "+Inf"), counts))
    text = "# TYPE edge_proxy_gc_pause_seconds histogram\n" + text
    b = energy_load.lag_buckets(text, energy_load.GC)
    assert b == {"0.05": 5.0, "0.25": 6.0, "+Inf": 7.0}
    assert energy_load.lag_summary(b, "gc") == {"gc_runs": 7.0, "gc_over_50ms": 2.0,
                                                "gc_max_bucket_seconds": float("inf")}
    assert energy_load.lag_buckets(text) == {}              # the loop-lag histogram is not in it


def test_grid_vs_paper_puts_our_row_next_to_the_papers(tmp_path: Path) -> None:
    with open(ROOT / "tests" / "data" / "paper_variants.csv", newline="") as f:
        paper = {(r["task"], r["precision"]): r for r in csv.DictReader(f)
                 if (r["family"], r["size"], r["method"]) == ("Llama", "1B", "LoRA")}
    summary = tmp_path / "summary.csv"
    cols = ["variant", "model", "task", "precision", "score", "e_req_joules", "n_break", "ipw", "rho_sys",
            "c_tax", "q_ret"]
    with open(summary, "w", newline="") as f:
        w = csv.DictWriter(f, cols)
        w.writeheader()
        w.writerow({"variant": "a", "model": "llama-3.2-1b", "task": "rag", "precision": "INT4", "score": 0.5,
                    "e_req_joules": 1.25, "n_break": 3, "ipw": 0.4, "rho_sys": 200, "c_tax": 1500, "q_ret": 98})
        w.writerow({"variant": "b", "model": "other", "task": "rag", "precision": "BF16", "score": 0.1})
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "grid_vs_paper.py"), str(summary)],
                         capture_output=True, text=True, check=True).stdout
    rows = [ln for ln in out.splitlines() if ln.startswith("| rag")]
    assert len(rows) == 1                            # only our llama rows
    p = paper[("rag", "INT4")]
    q_paper = 100 * float(p["score"]) / float(paper[("rag", "FP16")]["score"])
    assert f"0.5 / {float(p['score']):.3g}" in rows[0]
    assert f"1.25 / {float(p['energy_per_request_joules']):.3g}" in rows[0]
    assert f"1,500 / {float(p['c_tax']):,.0f}" in rows[0]
    assert f"98 / {q_paper:.3g}" in rows[0]
    bad = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "grid_vs_paper.py"), str(tmp_path / "no.csv")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1


def test_grid_eval_table_reads_each_variants_results(tmp_path: Path) -> None:
    (tmp_path / "variants.jsonl").write_text(json.dumps({"variant": "a-nf4"}) + "\n"
                                             + json.dumps({"variant": "b-int8"}) + "\n")
    (tmp_path / "eval" / "a-nf4").mkdir(parents=True)
    summary = {"n_items": 7, "per_pass": [{}, {}], "mean_score": 0.4567, "score_name": "f1",
               "mean_joules_per_request": 3.14159, "joules_ci95": [2.5, 3.75], "mean_output_tokens": 12.25,
               "mean_latency_seconds": 0.0421, "joules_source": "measured"}
    (tmp_path / "eval" / "a-nf4" / "results.json").write_text(
        json.dumps({"passes": 2, "concurrency": 8, "summary": summary}))
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "grid_eval_table.py"), str(tmp_path)],
                         capture_output=True, text=True, check=True).stdout
    rows = [ln for ln in out.splitlines() if ln.startswith("| a-") or ln.startswith("| b-")]
    assert rows[0] == ("| a-nf4 | 7 x 2 | 0.457 (f1) | 3.14 [2.50..3.75] | 12.2 | 0.042 | 8 | measured |")
    assert rows[1].startswith("| b-int8 | (no eval) |")
    bad = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "grid_eval_table.py"),
                          str(tmp_path / "none")], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1


def test_pinning_puts_the_targets_and_their_children_on_one_cpu_and_the_rest_elsewhere() -> None:
    """proxy_overhead.py --pin (support.pin_targets_apart): a target's process and its child (nginx's worker) on the
    first CPU, another process and this one on the others."""
    import os
    import time

    import support
    cpus = sorted(os.sched_getaffinity(0))
    assert len(cpus) >= 2, "CI's machine has 2 cores; the benchmark's --pin needs them"
    target = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; "
                               "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)']); time.sleep(30)"])
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        for _ in range(100):                             # the target's child has started
            if len(support.child_pids(target.pid)) > 1:
                break
            time.sleep(0.05)
        kids = support.child_pids(target.pid)
        assert len(kids) == 2
        assert support.pin_targets_apart([target.pid], [other.pid]) is None
        assert all(os.sched_getaffinity(p) == {cpus[0]} for p in kids)
        assert os.sched_getaffinity(other.pid) == set(cpus[1:]) == os.sched_getaffinity(0)
    finally:
        for tid in os.listdir("/proc/self/task"):           # every thread of this process, as before
            os.sched_setaffinity(int(tid), set(cpus))
        for p in support.child_pids(target.pid)[1:]:
            try:
                os.kill(p, 9)
            except OSError:
                pass
        target.kill()
        other.kill()
        target.wait()
        other.wait()
