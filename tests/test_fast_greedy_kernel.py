"""A decode step's greedy pick as two Triton kernels (``engines/fast/greedy_kernel.py``), run by Triton's interpreter
on CPU: the same tokens as ``argmax`` (the first maximal index, ties across and inside chunks), the same logprobs as
``x[token] - logsumexp(x)`` to float32 rounding, the tokens written into the step's input ids, and a fast engine
using it still produces ``model.generate``'s greedy tokens."""
from __future__ import annotations

import pytest
import torch

from model_server.engines.fast import greedy_kernel
from model_server.engines.fast.greedy_kernel import BLOCK, GreedyPicker, available, greedy_pick_packed, self_check
from model_server.engines.fast.sampling import greedy_pick

from tests.fast_engine_support import _greedy_vs_generate

pytestmark = pytest.mark.skipif(not available(), reason="Triton is a declared dependency; CI installs it")
tl = greedy_kernel.tl


def _logits(b: int, vocab: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(b, vocab, generator=g) * 4).to(dtype)
    if b > 1:                                    # the max twice, in different chunks: the first one wins
        x[1, [vocab - 1, 3]] = 30.0
    if b > 2:                                    # the max twice in one chunk
        x[2, [min(vocab - 1, BLOCK + 7), min(vocab - 2, BLOCK + 6)]] = 30.0
    if b > 3:                                    # one finite entry, the rest -inf
        x[3] = float("-inf")
        x[3, vocab // 2] = -3.0
    return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("b,vocab", [(1, 5000), (4, 2 * BLOCK), (5, BLOCK - 1), (4, 3 * BLOCK + 77)])
def test_matches_the_eager_pick(dtype, b, vocab):
    x = _logits(b, vocab, dtype, seed=vocab + b)
    tok, lp = greedy_pick(x.float())
    ids = torch.full((b,), -1, dtype=torch.int64)
    out = greedy_pick_packed(x, ids)
    assert out.dtype == torch.float64 and out.shape == (b, 2)
    assert torch.equal(ids, tok) and torch.equal(out[:, 0].long(), tok)
    assert torch.allclose(out[:, 1], lp.double(), rtol=0, atol=2e-5)


def test_rows_of_a_wider_tensor():
    """The LM head's output may be a row slice of a wider buffer: the row stride is honoured."""
    x = _logits(4, BLOCK + 300, torch.bfloat16, seed=1)
    wide = torch.zeros(4, BLOCK + 400, dtype=torch.bfloat16)
    wide[:, :BLOCK + 300] = x
    wide[:, BLOCK + 300:] = 99.0                 # past the vocabulary: must not be read
    view = wide[:, :BLOCK + 300]
    ids = torch.empty(4, dtype=torch.int64)
    greedy_pick_packed(view, ids)
    assert torch.equal(ids, greedy_pick(x.float())[0])


def test_self_check_and_the_fallback(monkeypatch):
    assert self_check(torch.device("cpu"), torch.bfloat16) is None
    assert GreedyPicker(torch.device("cpu")).on is False            # default: CUDA only
    picker = GreedyPicker(torch.device("cpu"), True)
    monkeypatch.setattr(greedy_kernel, "self_check", lambda device, dtype: "broken here")
    x = _logits(3, 700, torch.float32, seed=5)
    ids = torch.empty(3, dtype=torch.int64)
    out = picker.pick(x, ids)                                       # check fails: the eager ops, same answer
    assert picker.on is False and picker.error == "broken here"
    tok, lp = greedy_pick(x)
    assert torch.equal(ids, tok) and torch.equal(out[:, 1], lp.double())


def test_a_wrong_kernel_fails_its_check(monkeypatch):
    """The check must be able to fail: a combine that keeps the last maximal chunk instead of the first."""
    monkeypatch.setattr(greedy_kernel, "_chunks", None)       # re-jitted here, restored afterwards
    monkeypatch.setattr(greedy_kernel, "_combine", None)
    monkeypatch.setattr(greedy_kernel, "_combine_kernel", _last_chunk_combine)
    err = self_check(torch.device("cpu"), torch.bfloat16)
    assert err is not None and "differ" in err


def _last_chunk_combine(m_ptr, i_ptr, s_ptr, ids_ptr, out_ptr, NCH, NB: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, NB)
    m = tl.load(m_ptr + row * NCH + c, mask=c < NCH, other=float("-inf"))
    big = tl.max(m, axis=0)
    last = tl.max(tl.where(m == big, c, -1), axis=0)
    tok = tl.load(i_ptr + row * NCH + last).to(tl.int64)
    tl.store(ids_ptr + row, tok)
    tl.store(out_ptr + row * 2, tok.to(tl.float64))
    tl.store(out_ptr + row * 2 + 1, big.to(tl.float64) * 0)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_engine_with_the_kernels_matches_generate(arch):
    toks, refs, runner = _greedy_vs_generate(arch, 7, pick_kernel=True)
    assert runner.picker.on and runner.picker.checked and runner.picker.error is None
    assert toks == refs


@pytest.mark.filterwarnings("ignore::RuntimeWarning")       # the interpreter's numpy on NaN
def test_a_nan_row_stays_in_bounds():
    """A row of NaN logits has no chunk equal to its max: the combine must still read a chunk that exists (the token
    is undefined, as documented, but in range)."""
    x = _logits(2, 3 * BLOCK + 5, torch.float32, seed=9)
    x[1] = float("nan")
    ids = torch.empty(2, dtype=torch.int64)
    greedy_pick_packed(x, ids)
    assert ids[0] == greedy_pick(x[:1])[0][0] and 0 <= int(ids[1]) < x.shape[1]
