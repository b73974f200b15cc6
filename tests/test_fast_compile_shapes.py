"""``MODEL_SERVER_FAST_COMPILE_SHAPES`` (``engines/fast/fused.py``): the fused elementwise ops compiled with every
dimension symbolic (``dynamic``, the default) or static with only the step's rows, prompts and tokens marked dynamic
(``rows``). On CPU with a recording backend (dynamo traces, nothing is generated): in ``rows`` mode no graph has a
symbolic model size (the last dimension, rope's heads and head size), a new row count after the first few compiles
nothing, and a fast engine with it gives ``model.generate``'s greedy tokens; in ``dynamic`` mode the model sizes are
symbols (the difference the mode exists for)."""
from __future__ import annotations

import pytest
import torch

from model_server.engines.fast import fused
from model_server.switches import SwitchValueError

from tests.fast_engine_support import _greedy_vs_generate


class Recorder:
    """A torch.compile backend that runs the traced graph as it is and records, per graph, which dimensions of each
    tensor input are symbolic."""

    def __init__(self) -> None:
        self.graphs: list[list[tuple[bool, ...]]] = []

    def __call__(self, gm, example_inputs):
        dims = []
        for node in gm.graph.nodes:
            ev = node.meta.get("example_value") if node.op == "placeholder" else None
            if isinstance(ev, torch.Tensor):
                dims.append(tuple(isinstance(s, torch.SymInt) for s in ev.shape))
        self.graphs.append(dims)
        return gm.forward


@pytest.fixture
def recorder(monkeypatch):
    torch._dynamo.reset()
    rec = Recorder()
    monkeypatch.setattr(fused, "BACKEND", rec)
    monkeypatch.setattr(fused.Ops, "_compiled", None)
    monkeypatch.setattr(fused.Ops, "_compiled_mode", None)
    yield rec
    torch._dynamo.reset()


def test_row_dims():
    t3, t4 = torch.empty(2, 3, 8), torch.empty(2, 4, 3, 8)
    assert fused.row_dims("add_rms_norm", 0, t3) == (0, 1)
    assert fused.row_dims("add_rms_norm", 2, torch.empty(8)) == ()               # the weight
    assert fused.row_dims("rope", 0, t4) == (0, 2)                               # [n, heads, t, head_dim]
    assert fused.row_dims("add_parts_rms_norm", 1, t4) == (1, 2)                 # not the partials' count
    assert fused.row_dims("silu_mul", 1, t3) == (0, 1)


def test_the_switch(monkeypatch):
    monkeypatch.delenv(fused.SHAPES_SWITCH, raising=False)
    assert fused.shapes_mode() == "rows"                # the default since 2026-12-07
    monkeypatch.setenv(fused.SHAPES_SWITCH, "dynamic")
    assert fused.shapes_mode() == "dynamic"
    monkeypatch.setenv(fused.SHAPES_SWITCH, "static")
    with pytest.raises(SwitchValueError, match="MODEL_SERVER_FAST_COMPILE_SHAPES must be one of rows, dynamic"):
        fused.shapes_mode()


def _norm_calls(ops, hidden: int) -> None:
    w = torch.rand(hidden) + 0.5
    for shape in ((1, 1), (2, 1), (4, 1), (8, 1), (64, 1), (1, 5), (2, 7), (3, 9)):
        h, x = torch.randn(*shape, hidden), torch.randn(*shape, hidden)
        got = ops.add_rms_norm(h, x, w, 1e-5)
        assert all(torch.equal(a, b) for a, b in zip(got, fused.add_rms_norm(h, x, w, 1e-5)))


@pytest.mark.parametrize("mode", ["rows", "dynamic"])
def test_model_sizes_are_constants_only_in_rows_mode(mode, recorder, monkeypatch):
    monkeypatch.setenv(fused.SHAPES_SWITCH, mode)
    ops = fused.Ops(True)
    assert ops.fused, ops.error
    n0 = len(recorder.graphs)                  # the Ops' trial of each function
    _norm_calls(ops, 256)
    graphs = recorder.graphs[n0:]
    last_symbolic = [any(d[-1] for d in g if d) for g in graphs]
    if mode == "rows":
        assert not any(last_symbolic)          # the hidden size is a constant in every graph
        # decode rows 1 (specialized), then one graph for 2..64; prompts (1, t) and (n > 1, t): one each
        assert len(graphs) <= 4, graphs
        n1 = len(recorder.graphs)
        _norm_calls(ops, 256)                  # the same families again: nothing new
        assert len(recorder.graphs) == n1
    else:
        assert any(last_symbolic)


def test_rope_keeps_heads_and_head_size_constant(recorder, monkeypatch):
    monkeypatch.setenv(fused.SHAPES_SWITCH, "rows")
    ops = fused.Ops(True)
    n0 = len(recorder.graphs)
    for n, t in ((1, 5), (2, 7), (3, 9), (4, 16)):
        q, k = torch.randn(n, 4, t, 16), torch.randn(n, 2, t, 16)
        cos, sin = torch.randn(t, 16)[None, None], torch.randn(t, 16)[None, None]
        got = ops.rope(q, k, cos, sin)
        assert all(torch.equal(a, b) for a, b in zip(got, fused.rope(q, k, cos, sin)))
    graphs = recorder.graphs[n0:]
    assert len(graphs) <= 2, graphs
    for g in graphs:
        for d in g:
            if len(d) == 4:
                assert not d[1] and not d[3]    # heads and head size


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_engine_in_rows_mode_matches_generate(arch, recorder, monkeypatch):
    monkeypatch.setenv(fused.SHAPES_SWITCH, "rows")
    toks, refs, runner = _greedy_vs_generate(arch, 7, fuse=True)
    assert runner.ops.fused and toks == refs
    assert recorder.graphs and not any(any(d[-1] for d in g if len(d) in (2, 3)) for g in recorder.graphs)


def test_rows_mode_compiles_no_more_graphs_than_dynamic(monkeypatch):
    """The cold start's compile work: a fast engine serving the same requests compiles no more graphs in ``rows`` mode
    than in ``dynamic`` mode (each graph is a compile at warm-up or on a new shape while serving)."""
    counts = {}
    for mode in ("dynamic", "rows"):
        torch._dynamo.reset()
        rec = Recorder()
        monkeypatch.setattr(fused, "BACKEND", rec)
        monkeypatch.setattr(fused.Ops, "_compiled", None)
        monkeypatch.setattr(fused.Ops, "_compiled_mode", None)
        monkeypatch.setenv(fused.SHAPES_SWITCH, mode)
        toks, refs, runner = _greedy_vs_generate("llama", 7, fuse=True)
        assert runner.ops.fused and toks == refs
        counts[mode] = len(rec.graphs)
    torch._dynamo.reset()
    assert 0 < counts["rows"] <= counts["dynamic"], counts
