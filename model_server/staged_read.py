"""Reading a ``.safetensors`` file onto a device through staging buffers (``MODEL_SERVER_STAGED_READ=1``).

``safetensors.torch.load_file(path, device="cuda")`` copies each tensor from the memory-mapped file to the
GPU from pageable memory; the idea was that pinned, double-buffered copies would be faster. Measured on an H100
with the file in the page cache (benchmarks/read_weights.py, docs/benchmarks.md): 0.442 s against ``load_file``'s
0.380 s for 2.47 GB, so it stays an experiment, off by default. This reader allocates every tensor on the device
first, then streams the file's data section through two pinned host buffers: while one buffer's chunk is
copied to the device asynchronously, the next chunk is read into the other. Each tensor keeps its own
device storage (no shared slab that would outlive tensors the load later replaces, such as INT4's).

The format (the safetensors specification): 8 bytes little-endian header length, a JSON header mapping
each name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets into the data section, which
follows the header) plus an optional ``__metadata__``. A header that is not that, or a dtype this reader
does not know, raises :class:`StagedReadError`, and the caller falls back to ``load_file``.

Owns the read only: the caller picks the file and the device, and uses the tensors as ``load_file``'s.
On CPU the same chunking runs with plain buffers (what the tests check against ``load_file``); there it only
costs, since ``load_file``'s CPU tensors are views of the memory-mapped file (no copy at all): 0.96 s against
0.002 s for the 1B preset's 2.5 GB on the 2-core VM (benchmarks/read_weights.py). The switch is for CUDA.
"""
from __future__ import annotations

import contextlib
import json
import struct
from pathlib import Path
from typing import Any

import torch

CHUNK_BYTES = 64 << 20
MAX_HEADER_BYTES = 100 << 20

DTYPES = {"BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
          "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
          "F64": torch.float64}


class StagedReadError(ValueError):
    """The file is not one this reader takes (the message says why, in one line)."""


def read_header(f: Any, size: int) -> tuple[int, dict[str, tuple[int, int, list[int], torch.dtype]]]:
    """(where the data section starts, name -> (begin, end, shape, dtype)) from an open file of ``size`` bytes,
    every entry checked against the data section's size."""
    head = f.read(8)
    if len(head) < 8:
        raise StagedReadError("shorter than a safetensors header")
    (n,) = struct.unpack("<Q", head)
    if n > MAX_HEADER_BYTES or 8 + n > size:
        raise StagedReadError(f"header length {n} does not fit the file ({size} bytes)")
    try:
        header = json.loads(f.read(n))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StagedReadError(f"header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise StagedReadError("header is not a JSON object")
    header.pop("__metadata__", None)
    data_size = size - 8 - n
    entries = {}
    for name, e in header.items():
        try:
            begin, end = (int(x) for x in e["data_offsets"])
            shape = [int(d) for d in e["shape"]]
            dtype = DTYPES[e["dtype"]]
        except (KeyError, TypeError, ValueError):
            raise StagedReadError(f"tensor {name!r}: unknown dtype or malformed entry") from None
        if not 0 <= begin <= end <= data_size or end - begin != torch.Size(shape).numel() * dtype.itemsize:
            raise StagedReadError(f"tensor {name!r}: data_offsets {begin}..{end} do not hold {shape} {e['dtype']}")
        entries[name] = (begin, end, shape, dtype)
    return 8 + n, entries


def _targets(entries: dict[str, tuple[int, int, list[int], torch.dtype]],
             device: torch.device) -> tuple[list[tuple[int, int, torch.Tensor]], dict[str, torch.Tensor]]:
    """(begin, end, the tensor's bytes as a flat uint8 view) by offset, each tensor allocated on ``device``;
    and name -> tensor."""
    out, tensors = [], {}
    for name, (begin, end, shape, dtype) in entries.items():
        t = tensors[name] = torch.empty(shape, dtype=dtype, device=device)
        if end > begin:
            out.append((begin, end, t.view(-1).view(torch.uint8)))
    return sorted(out, key=lambda x: x[0]), tensors


def _fill(f: Any, buf: memoryview) -> None:
    """Read exactly ``len(buf)`` bytes into ``buf`` (a read may return fewer); a short file raises."""
    got = 0
    while got < len(buf):
        n = f.readinto(buf[got:])
        if not n:
            raise StagedReadError(f"file ended {len(buf) - got} bytes early")
        got += n


def read_file(path: str | Path, device: str | torch.device, chunk_bytes: int = CHUNK_BYTES) -> dict[str, torch.Tensor]:
    """Every tensor of ``path`` on ``device``, as ``safetensors.torch.load_file`` returns them (module docstring)."""
    device = torch.device(device)
    cuda = device.type == "cuda"
    with open(path, "rb", buffering=0) as f:
        size = f.seek(0, 2)
        f.seek(0)
        start, header = read_header(f, size)
        targets, tensors = _targets(header, device)
        end_of_data = max((e for _, e, _ in targets), default=0)
        stages = [torch.empty(min(chunk_bytes, max(end_of_data, 1)), dtype=torch.uint8, pin_memory=cuda)
                  for _ in range(2 if cuda else 1)]
        done: list[Any] = [None] * len(stages)             # CUDA: the event after each stage's last copy
        stream = torch.cuda.Stream(device) if cuda else None
        ti = pos = k = 0
        while pos < end_of_data:
            stage = stages[k % len(stages)]
            if done[k % len(stages)] is not None:
                done[k % len(stages)].synchronize()        # its previous chunk has left for the device
            n = min(stage.numel(), end_of_data - pos)
            f.seek(start + pos)
            _fill(f, memoryview(stage.numpy())[:n])
            with torch.cuda.stream(stream) if cuda else contextlib.nullcontext():
                while ti < len(targets) and targets[ti][0] < pos + n:
                    begin, end, flat = targets[ti]
                    lo, hi = max(begin, pos), min(end, pos + n)
                    flat[lo - begin:hi - begin].copy_(stage[lo - pos:hi - pos], non_blocking=cuda)
                    if end > pos + n:
                        break                                # the rest of this tensor is in the next chunk
                    ti += 1
                if cuda:
                    done[k % len(stages)] = torch.cuda.Event()
                    done[k % len(stages)].record(stream)
            pos += n
            k += 1
        if cuda:
            stream.synchronize()
    return tensors
