"""One request's bookkeeping inside the fast engine (:class:`Seq`), and the types a step passes around.

Owns what the scheduler and the step executor both read about a request: its slot, prompt length,
positions, tokens produced or in flight, and timing marks. It must not change them (:mod:`.scheduler`
does).
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from ..base import GenerationRequest, TokenEvent

# events to deliver after a step: event loop -> [(consumer queue, events)]
Out = dict[asyncio.AbstractEventLoop, list[tuple[Any, list[TokenEvent]]]]   # (queue or a sink's tag, events)
# a decode step's row: (sequence, its slot, the position its input token's K/V is written at)
Row = tuple["Seq", int, int]


@dataclass(eq=False)
class Seq:
    """A request from submission to finish (written by the engine's loop thread only, after admission)."""

    req: GenerationRequest
    loop: asyncio.AbstractEventLoop
    queue: Any                       # delivery.EventQueue, or the tag of engine_hub's sink
    arrival_ns: int
    max_new: int
    slot: int = -1
    prompt_len: int = 0
    generated: int = 0
    pos: int = 0                     # where the next input token's K/V is written
    launched: int = 0                # tokens produced or in flight (prefill's counts)
    prefilling: bool = False         # admitted into the next step's prompt segments (.mixed), not decoding yet
    done: bool = False               # consumer side: final event sent / cancel requested
    t_admit_ns: int = 0
    t_first_ns: int = 0
    batch_at_admission: int = 0
