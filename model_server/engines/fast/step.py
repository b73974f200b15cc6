"""The fast engine's step execution: one prefill or one decode step of a batch on the model.

Owns the device side of a step: the per-slot sampling parameters, the pinned staging buffers
(positions up, (token, logprob) down; double-buffered, step k uses buffer k % 2; one more for a
prefill's first tokens), the launch of a decode step *before* the previous step's tokens are read
(its inputs stay on the device, so host bookkeeping overlaps the device), the same for a prefill
(launched, then the next decode step launched behind it, then its first tokens read: the device
never waits for the host around a prefill), the one device-to-host sync per step, and the step
counters (steps, prefill passes, prefill/decode tokens and seconds).

It must not decide which requests run or finish them (:mod:`.scheduler` does); it reads a
sequence's prompt and sampling parameters and writes nothing back to it.
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass

import torch

from .runner import ModelRunner
from .sampling import SlotSampling, pack_rows, select_tokens
from .scheduler import Row, Seq


@dataclass
class InFlight:
    """A launched decode step whose tokens have not been read yet."""

    buffer: int                        # staging buffer index (0 / 1)
    event: "torch.cuda.Event | None"   # recorded after the copy down (CUDA), None elsewhere
    batch: int                         # rows computed (the batch bucket)
    rows: list[Row]


@dataclass
class PrefillInFlight:
    """A launched prefill whose first tokens have not been read yet."""

    event: "torch.cuda.Event | None"   # recorded after the copy down (CUDA), None elsewhere
    n: int                             # rows (admitted sequences)
    t0_ns: int                         # admission time


class StepExecutor:
    """Runs prefill and decode steps for one :class:`ModelRunner`."""

    def __init__(self, runner: ModelRunner, max_batch: int) -> None:
        self.runner = runner
        self.device = runner.device
        self.sampling = SlotSampling.allocate(max_batch, self.device)
        pin = self.device.type == "cuda"
        self._pos_stage = [torch.zeros(max_batch, dtype=torch.int64, pin_memory=pin) for _ in range(2)]
        self._out_stage = [torch.zeros(max_batch, 2, dtype=torch.float64, pin_memory=pin) for _ in range(2)]
        self._first_stage = torch.zeros(2 * max_batch, dtype=torch.float64, pin_memory=pin)
        # a prefill's per-row inputs, up in one copy: int64 (slot, prompt length, do_sample, top_k, seed) and
        # float32 (temperature, top_p); reused by the next prefill only after this one's event was waited on
        self._rows_stage_i = torch.zeros(5 * max_batch, dtype=torch.int64, pin_memory=pin)
        self._rows_stage_f = torch.zeros(2 * max_batch, dtype=torch.float32, pin_memory=pin)
        self._step_parity = 0
        self._plen_dev = torch.zeros(max_batch, dtype=torch.int64, device=self.device)
        # counters (written by the loop thread only; reads are atomic)
        self.steps = 0
        self.prefill_calls = 0
        self.prefill_tokens = 0
        self.decode_tokens = 0
        self.decode_seconds = 0.0
        self.prefill_seconds = 0.0

    def prefill_launch(self, batch: list[Seq], t0_ns: int) -> PrefillInFlight:
        """Enqueue the prefill of the admitted ``batch`` (slots assigned) and the pick of each first token;
        do not wait for it. The first tokens land in ``in_ids`` on the device (the next decode step reads
        them there) and in a pinned buffer that :meth:`prefill_collect` reads; ``t0_ns``: admission time."""
        n = len(batch)
        params = [s.req.params for s in batch]
        si = self._rows_stage_i[:5 * n].view(5, n)              # contiguous: one plain copy each
        sf = self._rows_stage_f[:2 * n].view(2, n)
        si[0, :n] = torch.tensor([s.slot for s in batch], dtype=torch.int64)
        si[1, :n] = torch.tensor([s.prompt_len for s in batch], dtype=torch.int64)
        pack_rows(params, [p.seed if p.seed is not None else random.getrandbits(62) for p in params], si[2:], sf)
        ints = si.to(self.device, non_blocking=True)            # pinned: no wait for the step in flight
        floats = sf.to(self.device, non_blocking=True)
        slot_idx = ints[0]
        self.sampling.set_rows(slot_idx, ints[2:], floats)
        self._plen_dev[slot_idx] = ints[1]
        logits = self.runner.prefill([s.slot for s in batch], [list(s.req.prompt_ids) for s in batch])
        any_s = any(p.do_sample for p in params)
        any_f = any(p.do_sample and (p.top_k > 0 or p.top_p < 1.0) for p in params)
        tok, lp = select_tokens(logits, slot_idx, self.sampling, torch.zeros_like(slot_idx), any_s, any_f)
        self.runner.in_ids[slot_idx] = tok
        first = self._first_stage[:2 * n].view(2, n)        # contiguous: an asynchronous copy down
        first.copy_(torch.stack([tok.to(torch.float64), lp.to(torch.float64)]), non_blocking=True)
        event = None
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
        self.prefill_tokens += sum(s.prompt_len for s in batch)
        self.prefill_calls += 1
        return PrefillInFlight(event, n, t0_ns)

    def prefill_collect(self, pf: PrefillInFlight) -> tuple[list[list[float]], int]:
        """Wait for a launched prefill: ``([tokens, logprobs], t_ns)``, one row each in batch order, and when
        they were read (the prefill's seconds run from admission to then)."""
        if pf.event is not None:
            pf.event.synchronize()
        host = self._first_stage[:2 * pf.n].view(2, pf.n).tolist()
        t1 = time.monotonic_ns()
        self.prefill_seconds += (t1 - pf.t0_ns) / 1e9
        return host, t1

    def launch(self, rows: list[Row], t0_ns: int, any_sampling: bool, any_filter: bool) -> InFlight | None:
        """Enqueue one decode step for ``rows`` (from the scheduler); do not wait for it.

        The step's inputs are already on the device (``in_ids`` holds each row's last token, written by
        the previous step's sampling or by prefill), so the next step is launched before this one's
        tokens reach the host: the host-side bookkeeping of step k overlaps the device's step k+1.
        ``t0_ns``: when the step's host work began (counted in ``decode_seconds``).
        """
        if not rows:
            return None
        b_needed = max(slot for _, slot, _ in rows) + 1
        len_needed = max(pos for _, _, pos in rows) + 1
        k = self._step_parity
        self._step_parity ^= 1
        stage = self._pos_stage[k]
        pos_host = [0] * b_needed
        for _, slot, pos in rows:
            pos_host[slot] = pos
        stage[:b_needed] = torch.tensor(pos_host, dtype=torch.int64)    # one host op, not one per row
        r = self.runner
        r.in_pos[:b_needed].copy_(stage[:b_needed], non_blocking=True)
        if b_needed < r.max_batch:
            r.in_pos[b_needed:].zero_()
        logits = r.decode(b_needed, len_needed)
        b = logits.shape[0]
        counter = r.in_pos[:b] - self._plen_dev[:b] + 1
        tok, lp = select_tokens(logits, slice(0, b), self.sampling, counter, any_sampling, any_filter)
        r.in_ids[:b].copy_(tok)
        out = self._out_stage[k]
        out[:b].copy_(torch.stack([tok.to(torch.float64), lp.to(torch.float64)], dim=1), non_blocking=True)
        event = None
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
        self.steps += 1
        self.decode_seconds += (time.monotonic_ns() - t0_ns) / 1e9
        return InFlight(k, event, b, rows)

    def collect(self, step: InFlight) -> list[list[float]]:
        """Wait for a launched step (the one device-to-host sync per step): ``[token, logprob]`` by slot."""
        if step.event is not None:
            step.event.synchronize()
        return self._out_stage[step.buffer][:step.batch].tolist()
