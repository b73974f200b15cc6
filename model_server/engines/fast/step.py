"""The fast engine's step execution: one prefill or one decode step of a batch on the model (a decode
step may carry new prompts as segments, :mod:`.mixed`).

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

from .mixed import run_mixed
from .runner import ModelRunner
from .sampling import SlotSampling, pack_picks, pack_rows, sampling_flags, select_tokens
from .scheduler import Row, Seq


@dataclass
class InFlight:
    """A launched decode step whose tokens have not been read yet."""

    buffer: int                        # staging buffer index (0 / 1)
    event: "torch.cuda.Event | None"   # recorded after the copy down (CUDA), None elsewhere
    batch: int                         # rows computed (the batch bucket)
    rows: list[Row]
    chunk: "list[Seq] | None" = None   # sequences prefilled in this step's prompt segments (.mixed)
    t0_ns: int = 0                     # their admission time


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
        self._pos_np = [t.numpy() for t in self._pos_stage]
        mx = runner.mixed
        self._out_stage = [torch.zeros(max_batch + mx.max_segments, 2, dtype=torch.float64, pin_memory=pin)
                           for _ in range(2)]
        # a mixed step's inputs (double-buffered like the positions): the chunk buffer, then per request
        # (slot, prompt length, final segment, do_sample, top_k, seed); floats (temperature, top_p)
        self._chunk_stage = [torch.zeros(mx.layout.size + 6 * mx.max_segments, dtype=torch.int64, pin_memory=pin)
                             for _ in range(2)]
        self._chunk_stage_f = [torch.zeros(2 * max(mx.max_segments, 1), dtype=torch.float32, pin_memory=pin)
                               for _ in range(2)]
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
        self.mixed_prefills = 0        # requests prefilled inside decode steps
        self.decode_tokens = 0
        self.decode_seconds = 0.0
        self.prefill_seconds = 0.0

    def prefill_launch(self, batch: list[Seq], t0_ns: int) -> PrefillInFlight:
        """Enqueue the prefill of the admitted ``batch`` (slots assigned) and the pick of each first token;
        do not wait for it. The first tokens land in ``in_ids`` on the device (the next decode step reads
        them there) and in a pinned buffer that :meth:`prefill_collect` reads; ``t0_ns``: admission time."""
        n = len(batch)
        ints = self._admit_rows(batch, self._rows_stage_i[:5 * n].view(5, n), self._rows_stage_f[:2 * n].view(2, n))
        logits = self.runner.prefill([s.slot for s in batch], [list(s.req.prompt_ids) for s in batch])
        tok, lp = self._pick_first(batch, logits, ints[0])
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

    def launch(self, rows: list[Row], t0_ns: int, any_sampling: bool, any_filter: bool,
               chunk: list[Seq] | None = None) -> InFlight | None:
        """Enqueue one decode step for ``rows`` (from the scheduler), with ``chunk``'s prompts as segments of
        the same pass (:mod:`.mixed`) if given; do not wait for it.

        The step's inputs are already on the device (``in_ids`` holds each row's last token, written by
        the previous step's sampling or by prefill), so the next step is launched before this one's
        tokens reach the host: the host-side bookkeeping of step k overlaps the device's step k+1.
        Rows that are not live write their K/V at the last position of their (free) slot, which no
        prompt reaches. ``t0_ns``: when the step's host work began (counted in ``decode_seconds``).
        """
        if not rows and not chunk:
            return None
        slots = [slot for _, slot, _ in rows]
        poss = [pos for _, _, pos in rows]
        b_needed = max(slots, default=0) + 1
        len_needed = max(poss, default=0) + 1
        k = self._step_parity
        self._step_parity ^= 1
        r = self.runner
        stage = self._pos_stage[k]
        host = self._pos_np[k]                 # the pinned buffer's numpy view: two host ops, not one per row
        host[:b_needed] = r.max_len - 1
        host[slots] = poss
        r.in_pos[:b_needed].copy_(stage[:b_needed], non_blocking=True)
        if b_needed < r.max_batch:
            r.in_pos[b_needed:].fill_(r.max_len - 1)
        first = picks = None
        if chunk:
            logits, first, n_seg = self._launch_mixed(k, chunk, b_needed, len_needed)
            b = logits.shape[0] - n_seg
        else:
            logits, picks = r.decode_picks(b_needed, len_needed)
            b = logits.shape[0]
        if picks is not None and not any_sampling:
            down = picks                       # greedy: picked (and written to in_ids) by the step itself
        else:
            counter = r.in_pos[:b] - self._plen_dev[:b] + 1
            tok, lp = select_tokens(logits[:b], slice(0, b), self.sampling, counter, any_sampling, any_filter)
            r.in_ids[:b].copy_(tok)
            down = pack_picks(tok, lp)
        if first is not None:
            down = torch.cat([down, pack_picks(*self._pick_first(chunk, logits[b:][first[2]], first[0]))])
        out = self._out_stage[k]
        out[:down.shape[0]].copy_(down, non_blocking=True)
        event = None
        if self.device.type == "cuda":
            event = torch.cuda.Event()
            event.record()
        self.steps += 1
        self.decode_seconds += (time.monotonic_ns() - t0_ns) / 1e9
        return InFlight(k, event, b, rows, chunk, chunk[0].t_admit_ns if chunk else 0)

    def _launch_mixed(self, k: int, chunk: list[Seq], b_needed: int, len_needed: int
                      ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Upload ``chunk``'s segments and sampling parameters (pinned, asynchronous) and run the mixed step.
        Returns its logits ``[b + s, V]``, the per-request device ints ``[6, n]`` and ``s``."""
        r = self.runner
        mx = r.mixed
        t = mx.seg_tokens
        parts: list[tuple[int, list[int], int]] = []
        final: list[int] = []
        for seq in chunk:
            p = list(seq.req.prompt_ids)
            parts += [(seq.slot, p[i:i + t], i) for i in range(0, len(p), t)]
            final.append(len(parts) - 1)
        n = len(chunk)
        size = mx.layout.size
        st = self._chunk_stage[k]
        s, need = mx.pack(st[:size], parts)
        per = st[size:size + 6 * n].view(6, n)
        per[2] = torch.tensor(final, dtype=torch.int64)
        mx.buf[:size].copy_(st[:size], non_blocking=True)
        ints = self._admit_rows(chunk, per, self._chunk_stage_f[k][:2 * n].view(2, n))
        self.prefill_tokens += sum(q.prompt_len for q in chunk)
        self.mixed_prefills += n
        return run_mixed(r, b_needed, max(len_needed, need), s), ints, s

    def _admit_rows(self, batch: list[Seq], si: torch.Tensor, sf: torch.Tensor) -> torch.Tensor:
        """Write each admitted sequence's slot (row 0), prompt length (row 1) and sampling parameters (the
        last three rows) into the pinned int64 ``si [>= 5, n]`` (rows between are the caller's) and float32
        ``sf [2, n]``, send both up without waiting, and set those slots' sampling parameters and prompt
        lengths on the device. Returns ``si`` on the device. A buffer is reused only after the step that
        read it was waited on."""
        params = [q.req.params for q in batch]
        si[0] = torch.tensor([q.slot for q in batch], dtype=torch.int64)
        si[1] = torch.tensor([q.prompt_len for q in batch], dtype=torch.int64)
        pack_rows(params, [p.seed if p.seed is not None else random.getrandbits(62) for p in params], si[-3:], sf)
        ints = si.to(self.device, non_blocking=True)
        floats = sf.to(self.device, non_blocking=True)
        self.sampling.set_rows(ints[0], ints[-3:], floats)
        self._plen_dev[ints[0]] = ints[1]
        return ints

    def _pick_first(self, batch: list[Seq], logits: torch.Tensor, slot_idx: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Each admitted sequence's first token and logprob from its prompt's last logits (row i: ``batch[i]``,
        in slot ``slot_idx[i]``), written into ``in_ids`` for the next decode step."""
        any_s, any_f = sampling_flags([q.req.params for q in batch])
        tok, lp = select_tokens(logits, slot_idx, self.sampling, torch.zeros_like(slot_idx), any_s, any_f)
        self.runner.in_ids[slot_idx] = tok
        return tok, lp

    def collect(self, step: InFlight) -> list[list[float]]:
        """Wait for a launched step (the one device-to-host sync per step): ``[token, logprob]`` by slot, then
        one per ``step.chunk`` request (its first token) in chunk order."""
        if step.event is not None:
            step.event.synchronize()
        n = step.batch + (len(step.chunk) if step.chunk else 0)
        host = self._out_stage[step.buffer][:n].tolist()
        if step.chunk:
            self.prefill_seconds += (time.monotonic_ns() - step.t0_ns) / 1e9
        return host
