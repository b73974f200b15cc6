"""Token selection on the GPU for a whole decode batch at once.

Greedy is ``argmax`` (the first maximal index, as ``model.generate`` does). Sampling is inverse-CDF
sampling with ONE uniform number per row, computed on the device as a pure function of the request's
seed and its token index (:func:`seeded_uniform`), over the tokens in vocabulary order (top-k and top-p
only zero the tokens they drop), so a seeded request reproduces its output whatever other requests
share the batch, and no host round trip or per-row generator launch is needed.
Temperature, then top-k, then top-p (nucleus) are applied in that order, as transformers' warpers do.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

_P = 2147483647  # 2^31 - 1 (a Mersenne prime); every product below stays under 2^63


def seeded_uniform(seed: torch.Tensor, counter: torch.Tensor) -> torch.Tensor:
    """A deterministic uniform in (0, 1) per row from int64 ``seed`` (< 2^31) and ``counter`` (token index).

    Nonlinear mixing modulo the prime p = 2^31-1 (squarings and a MINSTD multiply); all intermediate
    products are below 2^62, so int64 arithmetic is exact on every device. Returns float64.
    """
    x = (seed * 69069 + counter * 362437 + 12345) % _P
    x = (x * x + seed + 1) % _P
    x = (x * 48271) % _P
    x = (x * x + counter + 7) % _P
    x = (x * 48271) % _P
    return (x.to(torch.float64) + 0.5) / _P


@dataclass
class SlotSampling:
    """Per-slot sampling parameters, resident on the device (index = slot)."""

    do_sample: torch.Tensor    # bool [slots]
    temperature: torch.Tensor  # float32 [slots]
    top_k: torch.Tensor        # int64 [slots], 0 = off
    top_p: torch.Tensor        # float32 [slots], 1.0 = off
    seed: torch.Tensor         # int64 [slots]

    @classmethod
    def allocate(cls, slots: int, device: torch.device) -> "SlotSampling":
        return cls(
            do_sample=torch.zeros(slots, dtype=torch.bool, device=device),
            temperature=torch.ones(slots, dtype=torch.float32, device=device),
            top_k=torch.zeros(slots, dtype=torch.int64, device=device),
            top_p=torch.ones(slots, dtype=torch.float32, device=device),
            seed=torch.zeros(slots, dtype=torch.int64, device=device),
        )

    def set_rows(self, idx: torch.Tensor, ints: torch.Tensor, floats: torch.Tensor) -> None:
        """Set the parameters of the slots ``idx`` (int64 ``[n]``) from device tensors already there (no host
        round trip): ``ints`` int64 ``[3, n]`` = (do_sample 0/1, top_k, seed), ``floats`` float32 ``[2, n]`` =
        (temperature, top_p). :func:`pack_rows` makes them on the host."""
        self.do_sample[idx] = ints[0].bool()
        self.top_k[idx] = ints[1]
        self.seed[idx] = ints[2]
        self.temperature[idx] = floats[0]
        self.top_p[idx] = floats[1]


def pack_rows(params: list, seeds: list[int], ints: torch.Tensor, floats: torch.Tensor) -> None:
    """Write ``n = len(params)`` requests' sampling parameters into host buffers (``ints [3, >= n]`` int64,
    ``floats [2, >= n]`` float32, as :meth:`SlotSampling.set_rows` reads them); seeds reduced below 2^31 - 1."""
    n = len(params)
    ints[0, :n] = torch.tensor([int(bool(p.do_sample)) for p in params], dtype=torch.int64)
    ints[1, :n] = torch.tensor([int(p.top_k) for p in params], dtype=torch.int64)
    ints[2, :n] = torch.tensor([s % (_P - 1) for s in seeds], dtype=torch.int64)
    floats[0, :n] = torch.tensor([float(p.temperature) for p in params], dtype=torch.float32)
    floats[1, :n] = torch.tensor([float(p.top_p) for p in params], dtype=torch.float32)


def needs_filter(p) -> bool:
    """Whether sampling parameters ``p`` (``SamplingParams``) ask for top-k or top-p."""
    return p.top_k > 0 or p.top_p < 1.0


def sampling_flags(params: list) -> tuple[bool, bool]:
    """``(any_sampling, any_filter)`` of :func:`select_tokens` for the rows with these ``SamplingParams``."""
    return any(p.do_sample for p in params), any(p.do_sample and needs_filter(p) for p in params)


def greedy_pick(lf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The argmax token of each row of float32 logits ``lf [b, V]`` and its log-probability (log softmax)."""
    tok = lf.argmax(dim=-1)
    return tok, lf.gather(1, tok[:, None]).squeeze(1) - torch.logsumexp(lf, dim=-1)


def pack_picks(tok: torch.Tensor, logprob: torch.Tensor) -> torch.Tensor:
    """``[b, 2]`` float64 rows of (token, logprob): what a step copies to the host in one transfer."""
    return torch.stack([tok.to(torch.float64), logprob.to(torch.float64)], dim=1)


def select_tokens(logits: torch.Tensor, rows: torch.Tensor | slice, params: SlotSampling,
                  counter: torch.Tensor, any_sampling: bool, any_filter: bool
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick one token per row of ``logits`` ``[b, V]``; return ``(token_ids int64 [b], logprobs float32 [b])``.

    ``rows`` selects the slots' parameters (a slice ``[:b]`` for decode, an index tensor for prefill);
    ``counter`` is each row's token index (0 for the first generated token). ``any_sampling`` /
    ``any_filter`` are host-side flags that let an all-greedy batch skip the sampling kernels, and a
    batch without top-k/top-p skip the sort. The logprob is under the unmodified distribution
    (log softmax of the raw logits), as TGI reports it.
    """
    lf = logits.float()
    if not any_sampling:
        return greedy_pick(lf)
    lse = torch.logsumexp(lf, dim=-1)
    tok = lf.argmax(dim=-1)
    temp = params.temperature[rows].clamp_min(1e-5)
    scaled = lf / temp[:, None]
    u = seeded_uniform(params.seed[rows], counter).to(torch.float32)
    vocab = lf.shape[-1]
    probs = torch.softmax(scaled, dim=-1)
    if any_filter:
        # which tokens top-k and top-p keep, found in descending order; the draw below stays in vocabulary
        # order for every row, so a row without a filter draws the same token whether or not a batch mate
        # has one (its probabilities are not touched: all kept)
        s_logits, s_idx = scaled.sort(dim=-1, descending=True)
        k = params.top_k[rows]
        k = torch.where(k > 0, k, torch.full_like(k, vocab))
        ar = torch.arange(vocab, device=lf.device)
        s_logits = s_logits.masked_fill(ar[None, :] >= k[:, None], float("-inf"))
        s_probs = torch.softmax(s_logits, dim=-1)
        before = s_probs.cumsum(dim=-1) - s_probs      # mass strictly before each token
        keep = before < params.top_p[rows][:, None]
        keep[:, 0] = True
        keep &= s_logits > float("-inf")
        keep |= ((params.top_k[rows] <= 0) & (params.top_p[rows] >= 1.0))[:, None]   # rows without a filter
        probs = probs.masked_fill(~torch.zeros_like(keep).scatter_(1, s_idx, keep), 0.0)
    cdf = probs.cumsum(dim=-1)
    sampled = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None].contiguous()).clamp_(max=vocab - 1).squeeze(1)
    tok = torch.where(params.do_sample[rows], sampled, tok)
    logprob = lf.gather(1, tok[:, None]).squeeze(1) - lse
    return tok, logprob
