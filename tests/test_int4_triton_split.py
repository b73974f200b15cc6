"""The INT4 Triton GEMM's split-K reduction (model_server/int4_triton.py, int4_triton_split.py) in Triton's CPU
interpreter: the ticket path (the last program of an output tile sums the partials) against the old second kernel
and an fp32 reference, the ticket counters, the switch.

The interpreter runs a launch's programs one after another, so these tests cannot show a race between programs
(memory ordering, the counter's atomics on a GPU): they check the arithmetic, the ticket bookkeeping and the reuse of
the counters. The GPU check is benchmarks/int4_splitk_bench.py (ticket == kernel bit for bit, every shape, M 1..64).
"""
from __future__ import annotations

import pytest
import torch

from model_server import int4_triton, int4_triton_split
from model_server.int4_quant import dequantize_groupwise, quantize_groupwise
from model_server.switches import SwitchValueError

CPU = torch.device("cpu")
# (N, K, group, swap_ab): N not a multiple of BLOCK_N (a masked edge tile) in both tile layouts; 8 K-blocks each,
# so split 8 leaves one K-block per program
SHAPES = [(80, 512, 64, True), (72, 1024, 128, False)]


@pytest.fixture(autouse=True)
def _interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv(int4_triton_split.SWITCH, raising=False)
    int4_triton_split.mode.cache_clear()
    assert int4_triton.available()
    yield
    int4_triton_split.mode.cache_clear()


def _weights(n: int, k: int, group: int, seed: int) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    torch.manual_seed(seed)
    q, sz = quantize_groupwise(torch.randn(n, k) * 0.05, group)
    packed = (int4_triton.pack_int4(q, group), *int4_triton.split_scales_and_zeros(sz))
    return packed, dequantize_groupwise(q, sz, group).double()


def _counters() -> torch.Tensor:
    return int4_triton_split.counters(CPU, 0)          # this stream's buffer, as the launches left it


@pytest.mark.parametrize("n,k,group,swap_ab", SHAPES)
@pytest.mark.parametrize("split", [2, 4, 8])
def test_ticket_sum_equals_the_sum_kernel_bit_for_bit_and_the_reference(n, k, group, swap_ab, split):
    packed, w = _weights(n, k, group, n + split)
    for m in (1, 3, 16, 64):
        x = torch.randn(m, k)
        cfg = int4_triton.Config(16 if m <= 16 else 32, 64, split, 2, 4, swap_ab, False)
        ticket = int4_triton.int4_triton_mm(x, *packed, group, cfg, "ticket")
        assert not _counters().any(), "the last program of every tile resets its counter"
        kernel = int4_triton.int4_triton_mm(x, *packed, group, cfg, "kernel")
        assert torch.equal(ticket, kernel), (m, (ticket - kernel).abs().max())
        ref = x.double() @ w.t()
        assert float((ticket.double() - ref).norm() / ref.norm()) < 1e-5, m
        if m == 16:                                    # the same counters again (every call reuses them)
            again = int4_triton.int4_triton_mm(x, *packed, group, cfg, "ticket")
            assert torch.equal(again, ticket) and not _counters().any()


def test_fp16_output_and_the_default_config():
    """y in the activations' dtype; ``choose_config`` (8 SMs in the interpreter) splits a 1-row step of this shape."""
    (packed, w), m = _weights(64, 1024, 128, 3), 2
    x = torch.randn(m, 1024).half()
    assert int4_triton.choose_config(m, 64, 1024, 128, int4_triton._num_sms(CPU)).split_k > 1
    ticket = int4_triton.int4_triton_mm(x, *packed, 128)
    kernel = int4_triton.int4_triton_mm(x, *packed, 128, split_reduce="kernel")
    assert ticket.dtype == torch.float16 and torch.equal(ticket, kernel) and not _counters().any()
    ref = x.double() @ w.t()
    assert float((ticket.double() - ref).norm() / ref.norm()) < 3e-3


class _SpySum:
    """Stands in for the jitted sum kernel: counts launches and runs the real one."""

    def __init__(self, real) -> None:
        self.real, self.launches = real, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.real[grid]


@pytest.mark.parametrize("value,rows,second_kernel", [(None, 5, False), (None, 33, True), ("auto", 32, False),
                                                     ("ticket", 33, False), ("kernel", 5, True)])
def test_the_switch_picks_the_reduction(monkeypatch, value, rows, second_kernel):
    """auto (the default): the ticket up to TICKET_MAX_ROWS (32) rows, the sum kernel above (H100, 2026-12-06)."""
    if value is not None:
        monkeypatch.setenv(int4_triton_split.SWITCH, value)
    mm, real_sum = int4_triton._jitted(True)
    spy = _SpySum(real_sum)
    monkeypatch.setattr(int4_triton, "_jitted", lambda interpret: (mm, spy))
    packed, w = _weights(80, 512, 64, 5)
    x = torch.randn(rows, 512)
    y = int4_triton.int4_triton_mm(x, *packed, 64, int4_triton.Config(16, 64, 4, 2, 4, True, False))
    assert spy.launches == int(second_kernel)
    assert float((y.double() - x.double() @ w.t()).norm() / (x.double() @ w.t()).norm()) < 1e-5


def test_a_bad_switch_value_is_a_one_line_switch_error(monkeypatch):
    monkeypatch.setenv(int4_triton_split.SWITCH, "atomic")
    with pytest.raises(SwitchValueError, match=f"^{int4_triton_split.SWITCH} must be one of auto, ticket, kernel"):
        int4_triton_split.mode()
    packed, _ = _weights(80, 512, 64, 1)
    with pytest.raises(ValueError, match="split_reduce 'both'"):
        int4_triton.int4_triton_mm(torch.randn(2, 512), *packed, 64, split_reduce="both")


def test_counters_grow_keep_the_old_buffer_and_guard_graph_capture(monkeypatch):
    """A launch needing more tiles grows the stream's buffer (zeroed) and the device's graph buffer; while capturing
    the graph buffer serves if it is big enough, else a RuntimeError that says what to do."""
    monkeypatch.setattr(int4_triton_split, "_COUNTERS", {})
    monkeypatch.setattr(int4_triton_split, "_RETIRED", [])
    small = int4_triton_split.counters(CPU, 10)
    assert small.dtype == torch.int32 and small.numel() >= int4_triton_split.MIN_TILES and not small.any()
    assert int4_triton_split.counters(CPU, 10) is small
    big = int4_triton_split.counters(CPU, int4_triton_split.MIN_TILES + 1)
    assert big.numel() > int4_triton_split.MIN_TILES and not big.any()
    assert any(t is small for t in int4_triton_split._RETIRED)             # a graph may still point at it
    monkeypatch.setattr(int4_triton_split, "_capturing", lambda device: True)
    graph = int4_triton_split.counters(CPU, int4_triton_split.MIN_TILES + 1)    # grown by the eager launch above
    assert graph is not big and graph.numel() >= int4_triton_split.MIN_TILES + 1
    with pytest.raises(RuntimeError, match="being captured into a CUDA graph.*eagerly.*=kernel"):
        int4_triton_split.counters(CPU, graph.numel() + 1)


def test_reserve_covers_every_default_split_config():
    """``reserve(num_sms)`` sizes the graph counters for any default config: ``choose_config`` splits K only while
    the output tiles are fewer than the SMs."""
    for sms in (8, 108, 132, 148):
        for n, k in ((512, 2048), (2048, 2048), (3072, 2048), (2048, 8192), (16384, 2048), (128256, 2048)):
            for m in list(range(1, 130)) + [256, 512, 1024]:
                cfg = int4_triton.choose_config(m, n, k, 128, sms)
                tiles = -(-n // cfg.block_n) * -(-m // cfg.block_m)
                assert cfg.split_k == 1 or tiles < sms, (sms, n, k, m, cfg)


def test_sm90_code_orders_the_ticket(tmp_path):
    """Compiled for an H100 (sm_90; Triton compiles without a GPU, benchmarks/int4_compile_check.py): each thread's
    global stores of its partial, a CTA barrier, then one predicated (one thread's) GPU-scope acq_rel atomic on the
    counter; then, in the last program, a barrier and the partials' loads through L2 (.cg), the output's stores and the
    counter's reset. The two-kernel path has neither the atomic nor the .cg loads. This is the code the ordering
    argument (int4_triton._w4a16_kernel's docstring) rests on; it is not a test of a GPU's behaviour."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys; sys.path.insert(0, 'benchmarks'); import int4_compile_check as c; "
            "from model_server import int4_triton as t; cfg = t.Config(64, 64, 4, 3, 4, True, False); "
            "open(sys.argv[1], 'w').write(c.compile_gemm_sm90(cfg, 2048).asm['ptx']); "
            "open(sys.argv[2], 'w').write(c.compile_gemm_sm90(cfg, 2048, ticket=False).asm['ptx'])")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    ticket, kernel = tmp_path / "ticket.ptx", tmp_path / "kernel.ptx"
    r = subprocess.run([sys.executable, "-c", code, str(ticket), str(kernel)], cwd=Path(__file__).resolve().parents[1],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    ops = [line.strip() for line in ticket.read_text().splitlines()]
    atoms = [i for i, op in enumerate(ops) if "atom." in op]
    assert len(atoms) == 1 and ops[atoms[0]].startswith("@%p") and "atom.global.gpu.acq_rel.add" in ops[atoms[0]]
    atom = atoms[0]
    stored = max(i for i in range(atom) if "st.global" in ops[i])
    assert any(op.startswith("bar.sync") for op in ops[stored:atom])
    loads = [i for i, op in enumerate(ops) if "ld.global.cg" in op]
    assert loads and min(loads) > atom and len(loads) % 4 == 0
    assert any(op.startswith("bar.sync") for op in ops[atom:min(loads)])
    after = [op for op in ops[max(loads):] if "st.global" in op]
    assert len(after) >= 2 and after[-1].startswith("@%p") and "st.global.b32" in after[-1]   # y, then the reset
    old = kernel.read_text()
    assert "atom." not in old and "ld.global.cg" not in old
