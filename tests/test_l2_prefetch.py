"""The L2 prefetch of the next INT4 linear's weights (model_server/l2_prefetch.py) on CPU: the switch, which buffers a
linear reads per row count, that nothing is launched where it cannot help (CPU tensors, prefill rows, ``off``), that a
linear with a successor computes exactly what it did without, the engine's chain in step order, and the kernel
compiled for sm_90 by Triton's own ptxas (no GPU). Its speed is benchmarks/int4_l2_prefetch.py's (on a GPU)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from model_server import l2_prefetch
from model_server.switches import SwitchValueError

ROOT = Path(__file__).resolve().parents[1]


def test_the_switch_defaults_to_off_and_rejects_other_values(monkeypatch) -> None:
    monkeypatch.delenv(l2_prefetch.SWITCH, raising=False)
    assert l2_prefetch.mode() == "off"
    for value in ("inline", "side", "off"):
        monkeypatch.setenv(l2_prefetch.SWITCH, value)
        assert l2_prefetch.mode() == value
    monkeypatch.setenv(l2_prefetch.SWITCH, "on")
    with pytest.raises(SwitchValueError):
        l2_prefetch.mode()


def _fake_linear(kernel: str, rows_kernel: str | None, n: int = 2048) -> SimpleNamespace:
    t = {name: torch.zeros(4, dtype=torch.uint8) for name in
         ("mma_words", "mma_scales", "triton_packed", "triton_scales", "triton_zeros", "weight_packed",
          "scales_and_zeros")}
    return SimpleNamespace(kernel=kernel, rows_kernel=rows_kernel, out_features=n, **t)


def test_weight_buffers_follow_the_kernel_a_step_of_that_many_rows_runs() -> None:
    mma = _fake_linear("mma", "triton")
    assert l2_prefetch.weight_buffers(mma, 1) == [mma.mma_words, mma.mma_scales]
    assert l2_prefetch.weight_buffers(mma, 16) == [mma.mma_words, mma.mma_scales]
    assert l2_prefetch.weight_buffers(mma, 64) == [mma.triton_packed, mma.triton_scales, mma.triton_zeros]
    wide = _fake_linear("mma", "triton", n=16384)                      # wide layers keep mma up to 32 rows
    assert l2_prefetch.weight_buffers(wide, 32)[0] is wide.mma_words
    copy = _fake_linear("mma", "triton")                               # a narrow layer's int4pack copy: 1-4 rows
    copy.int4pack_rows = 4
    assert l2_prefetch.weight_buffers(copy, 4) == [copy.weight_packed, copy.scales_and_zeros]
    assert l2_prefetch.weight_buffers(copy, 5) == [copy.mma_words, copy.mma_scales]
    mixed = _fake_linear("cuda-int4pack", "triton")
    assert l2_prefetch.weight_buffers(mixed, 4) == [mixed.weight_packed, mixed.scales_and_zeros]
    assert l2_prefetch.weight_buffers(mixed, 64)[0] is mixed.triton_packed


def test_spans_round_down_to_16_bytes_and_skip_empty_buffers() -> None:
    a, b = torch.zeros(40, dtype=torch.uint8), torch.zeros(0, dtype=torch.uint8)
    c = torch.zeros(10, dtype=torch.float32)
    assert l2_prefetch._spans([a, b, c]) == [(a.data_ptr(), 32), (c.data_ptr(), 32)]
    with pytest.raises(ValueError):
        l2_prefetch._spans([a, a, a, a])


def test_nothing_is_launched_off_cuda_for_prefill_rows_or_when_off(monkeypatch) -> None:
    launched: list[object] = []
    monkeypatch.setattr(l2_prefetch, "prefetch", lambda bufs: launched.append(bufs))
    lin = _fake_linear("mma", "triton")
    assert l2_prefetch.ahead(lin, 8, "side") is None                   # CPU buffers
    assert l2_prefetch.ahead(lin, 8, "inline") is None
    assert l2_prefetch.ahead(lin, l2_prefetch.MAX_ROWS + 1, "inline") is None
    assert l2_prefetch.ahead(lin, 8, "off") is None
    assert launched == []
    l2_prefetch.join(None)                                             # nothing forked: nothing to wait for


def test_a_linear_with_a_successor_computes_the_same() -> None:
    from model_server.int4 import ComputeChoice, Int4Linear
    torch.manual_seed(0)
    choice = ComputeChoice(torch.float32, "cpu-int4pack", "test")
    a = Int4Linear(torch.nn.Linear(128, 64, bias=False), 32, choice)
    b = Int4Linear(torch.nn.Linear(128, 64, bias=False), 32, choice)
    x = torch.randn(3, 128)
    want = a(x)
    assert l2_prefetch.link([a, b], "side") == 1 and a.l2_next == (b, "side") and "l2_next" not in vars(b)
    assert torch.equal(a(x), want)
    assert l2_prefetch.link([a, b], None) == 0 and "l2_next" not in vars(a)


@pytest.mark.parametrize("merge", [True, False])
def test_the_chain_is_the_step_order_of_the_int4_linears(merge: bool) -> None:
    pytest.importorskip("transformers")
    from model_server.engines.fast.factory import install_l2_prefetch, l2_chain
    from model_server.int4 import ComputeChoice, quantize_model
    from tests.fast_engine_support import _engine, _tiny
    model = _tiny("llama", hidden_size=128, intermediate_size=256)
    quantize_model(model, 32, ComputeChoice(torch.float32, "cpu-int4pack", "test"))
    eng = _engine(model, merge_projections=merge)
    chain = l2_chain(eng.runner)
    want = []
    for li, layer in enumerate(model.model.layers):
        att, mlp = layer.self_attn, layer.mlp
        want += [eng.runner.qkv[li].fn] if merge else [att.q_proj, att.k_proj, att.v_proj]
        want.append(att.o_proj)
        want += [eng.runner.gate_up[li].fn] if merge else [mlp.gate_proj, mlp.up_proj]
        want.append(mlp.down_proj)
    assert [id(m) for m in chain] == [id(m) for m in want]
    assert model.lm_head not in chain
    assert install_l2_prefetch(eng, "side") == 0                       # off CUDA: nothing chained
    assert all("l2_next" not in vars(m) for m in chain)


_COMPILE = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from model_server import l2_prefetch
sig = {name: "i64" for name in ("a0", "n0", "a1", "n1", "a2", "n2")}
sig.update(p1="i32", p2="i32", CHUNK_B="constexpr", LANES_N="constexpr")
k = triton.compile(ASTSource(fn=l2_prefetch._kernel(), signature=sig,
                             constexprs={"CHUNK_B": l2_prefetch.CHUNK, "LANES_N": l2_prefetch.LANES}),
                   target=GPUTarget("cuda", 90, 32), options={"num_warps": 1})
print("bulk" if "cp.async.bulk.prefetch.L2.global" in k.asm["ptx"] else "none", len(k.asm["cubin"]))
"""


def test_the_kernel_compiles_for_sm90_with_the_bulk_prefetch(tmp_path) -> None:
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}     # compile, not interpret
    env.update(TRITON_CACHE_DIR=str(tmp_path), PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", _COMPILE], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    kind, cubin = proc.stdout.split()
    assert kind == "bulk" and int(cubin) > 0                           # the instruction is there; ptxas took it


def test_the_benchmark_says_in_one_line_that_it_needs_a_gpu(tmp_path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    env.update(CUDA_VISIBLE_DEVICES="", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "benchmarks/int4_l2_prefetch.py", "--out", str(tmp_path)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["int4_l2_prefetch: needs a CUDA device"]
