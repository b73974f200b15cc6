"""``benchmarks/steady_state.py`` on CPU (tiny model): the report carries card, date, command, commit and the
``MODEL_SERVER_*`` switches set, every cell has one tokens/s per window and the median of them, and HTTP cells count
tokens."""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_steady_state_smoke(tmp_path, tiny_model_dir):
    out = tmp_path / "ss"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "steady_state.py"), "--preset", "tiny", "--model-dir", tiny_model_dir,
           "--quants", "bf16,int4,gptq-act", "--concurrency", "2", "--http-concurrency", "2", "--window-s", "0.5", "--warm-s", "0.5",
           "--new-tokens", "8", "--agree-prompts", "2", "--agree-tokens", "4", "--commit", "abc1234", "--out", str(out),
           "--api-workers", "0,1"]
    r_out = subprocess.run(cmd, check=True, timeout=600, capture_output=True, text=True,
                           env={**os.environ, "PYTHONUNBUFFERED": "1",
                                "MODEL_SERVER_INT4_TRITON_PAIRED_SCALES": "0"}).stdout
    r = json.loads((out / "steady_state.json").read_text())
    assert r["commit"] == "abc1234" and r["card"] == "cpu" and r["date"] and "steady_state.py" in r["command"]
    assert r["switches"]["MODEL_SERVER_INT4_TRITON_PAIRED_SCALES"] == "0"   # an A/B arm's switches are in its file
    assert all(k.startswith("MODEL_SERVER_") for k in r["switches"])
    quants = {q["quant"]: q for q in r["quants"]}
    assert set(quants) == {"bf16", "int4", "gptq-act"}
    assert quants["int4"]["weight_bytes"] < quants["bf16"]["weight_bytes"]
    # a GPTQ-format copy (act order) served through the fast engine's repack: INT4 linears, bf16 LM head
    assert quants["gptq-act"]["int4_kernel"] == "cpu-int4pack"
    assert quants["gptq-act"]["weight_bytes"] < quants["bf16"]["weight_bytes"]
    assert quants["gptq-act"]["agreement_vs_bf16"]["teacher_forced_match"] is None
    for q in quants.values():
        assert [c["concurrency"] for c in q["cells"]] == [2]
        for c in q["cells"]:
            w = c["tokens_per_second_windows"]
            assert len(w) == 3 and c["tokens_per_second_median"] == pytest.approx(statistics.median(w), abs=0.2)
            assert c["tokens_per_second_min"] <= c["tokens_per_second_median"] <= c["tokens_per_second_max"]
            assert c["tokens_per_second_median"] > 0
    http = quants["bf16"]["http"]
    assert [c["api_workers"] for c in http] == [0, 1]          # HTTP in the engine's process, then 1 API worker
    assert all(c["errors"] == 0 and c["tokens_per_second_median"] > 0 and c["ratio_to_in_process"] > 0 for c in http)
    assert all(0 < c["client_cpu_per_process"] for c in http)
    # the engine's own view of the same windows: steps/s, and tokens per step (a step decodes at most one
    # token per stream and may also prefill a stream's first token: at most 2x the concurrency)
    for c in [*quants["bf16"]["cells"], *http]:
        assert c["engine_steps_per_second"] > 0 and 0 < c["engine_tokens_per_step"] <= 2 * c["concurrency"]
    assert 0 <= quants["int4"]["agreement_vs_bf16"]["teacher_forced_match"] <= 1
    synthetic = json.loads((Path(tiny_model_dir) / "config.json").read_text()).get("edge_eval_synthetic", False)
    assert quants["int4"]["agreement_vs_bf16"]["synthetic_weights"] is synthetic
    assert ("agree (synthetic weights" in r_out) is synthetic           # the printed line says so too
    assert quants["bf16"]["mma_glu_ready"] is None                   # no INT4 layer: not a reading of the epilogue
    assert quants["int4"]["mma_glu_ready"] is False                  # on CPU the mma kernel never serves
