"""A decode step's greedy pick in two Triton kernels: each row's argmax token and its log-probability, packed.

The eager pick (:func:`.sampling.greedy_pick` then :func:`.sampling.pack_picks`) is ~17 kernels after the LM
head: a float copy of the logits, ``argmax``, the two reductions and the elementwise ops of ``logsumexp``, a
gather and the packing. At one row of a 128k vocabulary that was ~75 us of a 1.36 ms bf16 step on an H100
(docs/benchmarks.md, "The greedy pick as two kernels"): ``argmax`` alone ran 26 us as one program per row.

Here the vocabulary is cut into ``BLOCK``-wide chunks; kernel 1, one program per (row, chunk), reads the logits
in their own dtype and writes the chunk's max, its first maximal index and ``sum(exp(x - max))``; kernel 2, one
program per row, combines them::

    M = max_c m_c,   token = the first maximal index of the first chunk with m_c = M,
    S = sum_c s_c * exp(m_c - M),   logprob = M - (M + log S)   (natural log, float32)

which is ``argmax`` (the first maximal index, as ``model.generate``) and ``x[token] - logsumexp(x)`` as the eager
ops compute them (the sum in another order: the logprob agrees to float32 rounding). Kernel 2 writes the token into
the step's input ids and ``(token, logprob)`` as float64 into the packed ``[b, 2]`` rows the host reads.

Owns the kernels, their launch and the choice (:class:`GreedyPicker`: on for CUDA where Triton imports, checked
against the eager pick before its first use, never while a graph is being captured); the runner calls it.
``TRITON_INTERPRET=1`` runs it on CPU (tests). A row holding NaN gets an undefined token (the eager ``argmax``
returns the NaN's index).
"""
from __future__ import annotations

import logging
from typing import Any

import torch

from . import rope_kv as _triton_gate
from .sampling import greedy_pick, pack_picks

log = logging.getLogger(__name__)

triton: Any = None                   # set by available(): imported at first use (cold start, CPU installs)
tl: Any = None
_chunks: Any = None
_combine: Any = None
BLOCK = 2048                         # vocabulary entries per program of kernel 1


def available() -> bool:
    """Triton importable, and a CUDA device or ``TRITON_INTERPRET=1``."""
    global triton, tl
    ok = _triton_gate.available(2)
    triton, tl = _triton_gate.triton, _triton_gate.tl
    return ok


def _chunk_kernel(x_ptr, m_ptr, i_ptr, s_ptr, V, stride_row, NCH, BLOCK: tl.constexpr):
    """Program (row, chunk): the chunk's max, first maximal index and sum of exp(x - max) (0 for an all -inf
    chunk), into ``[row, chunk]`` of the three scratch arrays."""
    row = tl.program_id(0).to(tl.int64)
    ch = tl.program_id(1)
    offs = ch * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + row * stride_row + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
    m = tl.max(x, axis=0)
    idx = tl.min(tl.where(x == m, offs, 2147483647), axis=0)
    idx = tl.minimum(idx, tl.minimum(V, (ch + 1) * BLOCK) - 1)        # NaN: nothing equals the max; stay in range
    s = tl.sum(tl.exp(x - tl.where(m == float("-inf"), 0.0, m)), axis=0)     # an all -inf chunk: 0, not NaN
    tl.store(m_ptr + row * NCH + ch, m)
    tl.store(i_ptr + row * NCH + ch, idx)
    tl.store(s_ptr + row * NCH + ch, s)


def _combine_kernel(m_ptr, i_ptr, s_ptr, ids_ptr, out_ptr, NCH, NB: tl.constexpr):
    """Program row: the row's token (the first chunk at the max, its index) into ``ids[row]``, and ``(token,
    logprob)`` as float64 into ``out[row, 0:2]``."""
    row = tl.program_id(0).to(tl.int64)
    c = tl.arange(0, NB)
    m = tl.load(m_ptr + row * NCH + c, mask=c < NCH, other=float("-inf"))
    big = tl.max(m, axis=0)
    first = tl.minimum(tl.min(tl.where(m == big, c, NB), axis=0), NCH - 1)   # NaN logits: no chunk equals the max
    tok = tl.load(i_ptr + row * NCH + first).to(tl.int64)
    s = tl.load(s_ptr + row * NCH + c, mask=c < NCH, other=0.0)
    total = tl.sum(tl.where(c < NCH, s * tl.exp(m - big), 0.0), axis=0)
    lse = big + tl.log(total)
    tl.store(ids_ptr + row, tok)
    tl.store(out_ptr + row * 2, tok.to(tl.float64))
    tl.store(out_ptr + row * 2 + 1, (big - lse).to(tl.float64))


def greedy_pick_packed(logits: torch.Tensor, ids_out: torch.Tensor) -> torch.Tensor:
    """Greedy picks of ``logits [b, V]`` (any float dtype, last dim contiguous): tokens written into ``ids_out``
    (int64 ``[b]``), returned ``[b, 2]`` float64 rows of (token, logprob), as :func:`.sampling.pack_picks` packs
    :func:`.sampling.greedy_pick`'s result."""
    global _chunks, _combine
    if _chunks is None:
        _chunks, _combine = triton.jit(_chunk_kernel), triton.jit(_combine_kernel)
    b, vocab = logits.shape
    nch = triton.cdiv(vocab, BLOCK)
    dev = logits.device
    m = torch.empty(b, nch, dtype=torch.float32, device=dev)
    idx = torch.empty(b, nch, dtype=torch.int32, device=dev)
    s = torch.empty(b, nch, dtype=torch.float32, device=dev)
    out = torch.empty(b, 2, dtype=torch.float64, device=dev)
    _chunks[(b, nch)](logits, m, idx, s, vocab, logits.stride(0), nch, BLOCK=BLOCK, num_warps=4)
    _combine[(b,)](m, idx, s, ids_out, out, nch, NB=triton.next_power_of_2(nch), num_warps=1)
    return out


def self_check(device: torch.device, dtype: torch.dtype) -> str | None:
    """The kernels against the eager pick on rows with ties across and inside chunks: None if every token is the
    same and every logprob within 1e-4, else why not (one line)."""
    if not available():
        return "needs Triton and a CUDA device (or TRITON_INTERPRET=1)"
    try:
        gen = torch.Generator(device=device).manual_seed(0)
        vocab = 3 * BLOCK + 77
        x = torch.randn(4, vocab, generator=gen, device=device).to(dtype)
        x[1, [5, BLOCK + 9, 2 * BLOCK + 1]] = 9.0          # a tie across chunks: the first index wins
        x[2, [BLOCK + 3, BLOCK + 4]] = 9.0                  # a tie inside one chunk
        x[3] = 0.5                                          # all equal
        ref_tok, ref_lp = greedy_pick(x.float())
        ids = torch.empty(4, dtype=torch.int64, device=device)
        out = greedy_pick_packed(x, ids)
        if not torch.equal(ids, ref_tok) or not torch.equal(out[:, 0].long(), ref_tok):
            return f"tokens {ids.tolist()} differ from argmax's {ref_tok.tolist()}"
        err = float((out[:, 1] - ref_lp.double()).abs().max())
    except Exception as exc:  # noqa: BLE001 - any failure: the caller keeps the eager pick
        return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"
    return None if err <= 1e-4 else f"logprobs differ from the eager pick's by {err:.3g} (tolerance 1e-4)"


class GreedyPicker:
    """A decode step's greedy pick: the two kernels where on (``on=None``: on a CUDA device with Triton; True:
    always, e.g. Triton's interpreter; False: never) and their check passed, else the eager ops."""

    def __init__(self, device: torch.device, on: bool | None = None) -> None:
        self.device = device
        self.on = on is True or (on is None and device.type == "cuda" and available())
        self.checked = False
        self.error: str | None = None      # why the kernels were turned off at their first use

    def pick(self, logits: torch.Tensor, ids_out: torch.Tensor) -> torch.Tensor:
        """Each row's greedy token written into ``ids_out`` (int64 ``[b]``) and ``[b, 2]`` float64 (token,
        logprob) returned."""
        if self.on and self._ok():
            return greedy_pick_packed(logits, ids_out)
        tok, lp = greedy_pick(logits.float())
        ids_out.copy_(tok)
        return pack_picks(tok, lp)

    def _ok(self) -> bool:
        if not self.checked:
            if self.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                return False
            self.checked = True
            self.error = self_check(self.device, torch.bfloat16)
            if self.error is not None:
                self.on = False
                log.warning("greedy pick kernels off, using the eager ops: %s", self.error)
        return self.on
