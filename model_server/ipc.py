"""Messages between the engine process and its API worker processes (``serve --api-workers N``).

Owns the wire format only: each message is a 4-byte big-endian length and a pickled tuple whose first
item names it. Both ends are this package's own processes over a private ``socketpair`` (never a
network socket), so pickle is safe. It must not decide what a message does (:mod:`model_server.engine_hub`
and :mod:`model_server.remote_engine` do).

Worker -> engine::

    ("submit", handle, request_id, prompt_ids, params_tuple, arrival_ns)   # SamplingParams as a tuple
    ("cancel", handle)
    ("stats?",)                                                             # answered with "stats"
    ("listening", pid)                                                      # the worker's HTTP site is up
    ("drained",)                                                            # draining, none of its requests left

Engine -> worker::

    ("tokens", [(handle, token_id, logprob, finish_reason, error), ...],    # one engine step, all of
               {handle: RequestTiming tuple})                               # this worker's requests
    ("state", {"state", "info", "limits", "model", "gauges"})                # lifecycle + what /info shows
    ("stats", EngineStats)                                                   # twice a second, and on "stats?"
    ("exit",)                                                                # drain and stop
"""
from __future__ import annotations

import asyncio
import pickle
import struct
from typing import Any

_LEN = struct.Struct(">I")
MAX_MESSAGE_BYTES = 1 << 30


def encode(msg: tuple[Any, ...]) -> bytes:
    data = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
    return _LEN.pack(len(data)) + data


async def read_message(reader: asyncio.StreamReader) -> tuple[Any, ...] | None:
    """The next message, or None at end of stream (the other process closed or died)."""
    try:
        head = await reader.readexactly(_LEN.size)
        (n,) = _LEN.unpack(head)
        if n > MAX_MESSAGE_BYTES:
            return None
        return pickle.loads(await reader.readexactly(n))
    except (asyncio.IncompleteReadError, ConnectionError, OSError):
        return None


async def open_socket(sock) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """asyncio streams over a connected Unix socket, with a read buffer that fits a large step."""
    return await asyncio.open_unix_connection(sock=sock, limit=1 << 24)


def send(writer: asyncio.StreamWriter, msg: tuple[Any, ...]) -> bool:
    """Queue ``msg`` on ``writer`` (no await: asyncio buffers it); False if the peer is gone."""
    if writer.is_closing():
        return False
    try:
        writer.write(encode(msg))
    except (ConnectionError, OSError, RuntimeError):
        return False
    return True
