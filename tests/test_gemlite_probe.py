"""benchmarks/gemlite_probe.py and int4_gemlite.py on CPU: our INT4 weights in GemLite's (HQQ's) format are the same
weights up to one rounding of the folded offset, a decode step's linears are summed as 16 layers plus the LM head, the
table reads the cells, and without a GPU the probe exits 2 with one line (GemLite itself imports only with CUDA: the
GPU machine runs it, ``gpu_calls.sh gemlite``)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gemlite_probe as gp  # noqa: E402
from int4_gemlite import folded_weight, hqq_meta  # noqa: E402
from model_server.int4_quant import dequantize_groupwise, quantize_groupwise  # noqa: E402


@pytest.mark.parametrize("group", [64, 128])
def test_hqq_format_is_our_weight(group):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(96, 256, generator=g) * 0.02
    q, sz = quantize_groupwise(w, group)
    sz = sz.to(torch.bfloat16)                          # as the served layers hold them
    ours = dequantize_groupwise(q, sz, group)
    scales, zeros = hqq_meta(sz)
    assert scales.shape == zeros.shape == (96, 256 // group) and scales.dtype == torch.bfloat16
    theirs = folded_weight(q, scales, zeros, group)
    # the same weight up to the bf16 rounding of 8 - zero / scale and of the folded offset: a fraction of one step
    step = sz[..., 0].t().float().repeat_interleave(group, dim=1)
    assert ((theirs - ours).abs() / step).max() < 0.2
    assert ((theirs - w).abs() / step).max() <= 0.75    # and within a quantization step of the float weight


def test_steps_sum_sixteen_layers_and_the_lm_head():
    shapes = {**gp.MERGED, "lm_head": gp.LM_HEAD}
    cells = [{"shape": s, "m": 64, "method": mm, "graph_us": 1.0 + i + 10 * j}
             for i, s in enumerate(shapes) for j, mm in enumerate(gp.METHODS)]
    st = gp.steps(cells, [64], shapes)
    layer = sum(1.0 + i for i, _ in enumerate(gp.MERGED))                     # bf16: 1 + 2 + 3 + 4
    assert st["64/bf16"] == 16 * layer + (1.0 + len(gp.MERGED))
    assert st["64/gemlite"] == 16 * (layer + 20 * len(gp.MERGED)) + (1.0 + len(gp.MERGED) + 20)
    cells[0].pop("graph_us")                                                 # a failed cell: no step figure
    assert gp.steps(cells, [64], shapes)["64/bf16"] is None
    md = gp.markdown({"device": "d", "torch": "t", "group": 128, "ms": [64], "cells": cells,
                      "steps": gp.steps(cells, [64], shapes)})
    assert "| lm_head | 64 | 5.0 (nan) | 15.0 (nan) | 25.0 (nan) | 1.67 |" in md


def test_without_a_gpu_it_exits_2_with_one_line():
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gemlite_probe.py"), "--ms", "64"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin"})
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "needs a GPU" in r.stderr
