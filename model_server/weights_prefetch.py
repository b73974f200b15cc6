"""Weights prefetch: the checkpoint's safetensors files read into the OS page cache while ``serve`` imports torch.

On a node whose disk has not served the model yet (a scale-up onto a fresh node, a new volume), the load's read
is a disk read, and it starts only once torch is imported (2.2-2.9 s into a start on the H100 host with cached
bytecode, docs/benchmarks.md). :func:`start` reads the files once, sequentially, on a thread of its own from the
moment the load begins (right after the server listens): file reads release the GIL, so the disk works while
Python imports, and the load then reads from memory. With the files already cached it costs a memory pass.

``MODEL_SERVER_PREFETCH_WEIGHTS``: unset or ``1`` on, ``0`` off (a bad value is a one-line error). Skipped, with the
reason, for a hub id (no local files) and when the files exceed half the memory available (reading them would push
their own first bytes out again). Never raises once started: a failed read is recorded and logged.

Owns that thread and its record (``/info`` ``weights_prefetch``); the load itself is :mod:`model_server.loading`'s.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from model_server.switches import flag

log = logging.getLogger(__name__)

SWITCH = "MODEL_SERVER_PREFETCH_WEIGHTS"
CHUNK_BYTES = 8 << 20
MEMORY_SHARE = 0.5          # at most this share of MemAvailable


@dataclass
class Prefetch:
    """One prefetch: the files, how far it got, and how it ended (``seconds`` is set when the thread is done)."""
    files: list[Path] = field(default_factory=list)
    total_bytes: int = 0
    read_bytes: int = 0
    seconds: float | None = None
    skipped: str | None = None
    error: str | None = None
    _done: threading.Event = field(default_factory=threading.Event, repr=False)

    def wait(self, timeout: float | None = None) -> bool:
        """True once the thread ended (or nothing was started)."""
        return self._done.wait(timeout)

    def as_dict(self) -> dict[str, Any]:
        return {"files": len(self.files), "total_bytes": self.total_bytes, "read_bytes": self.read_bytes,
                "seconds": self.seconds, "skipped": self.skipped, "error": self.error}


def checkpoint_files(model_id: str) -> list[Path]:
    """The ``*.safetensors`` files of a local model folder, sorted (none for a hub id)."""
    folder = Path(model_id)
    return sorted(p for p in folder.glob("*.safetensors") if p.is_file()) if folder.is_dir() else []


def available_memory_bytes(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    """``MemAvailable`` in bytes, None where the host does not say."""
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _read_all(job: Prefetch, paths: list[Path], on_done: Callable[[Prefetch], None] | None) -> None:
    buf = bytearray(CHUNK_BYTES)
    t0 = time.monotonic()
    try:
        for path in paths:
            with open(path, "rb", buffering=0) as f:     # raw reads: the GIL is released for each chunk
                while n := f.readinto(buf):
                    job.read_bytes += n
    except OSError as exc:
        job.error = f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc)
        log.warning("weights prefetch stopped: %s", job.error)
    job.seconds = round(time.monotonic() - t0, 3)
    log.info("weights prefetch: %.2f GB in %.2f s", job.read_bytes / 1e9, job.seconds)
    job._done.set()
    if on_done is not None:
        on_done(job)


def _why_not(job: Prefetch, model_id: str, available: int | None) -> str | None:
    """Fill ``job.files`` and ``job.total_bytes``; the reason not to read them, or None."""
    try:
        paths = checkpoint_files(model_id)
        job.total_bytes = sum(p.stat().st_size for p in paths)
    except OSError as exc:               # a folder that changes under us: the load will say what is wrong
        return f"cannot list the weights: {exc.strerror or exc}"
    job.files = paths
    limit = available_memory_bytes() if available is None else available
    if not paths:
        return "no local safetensors files"
    if limit is not None and job.total_bytes > MEMORY_SHARE * limit:
        return f"{job.total_bytes / 1e9:.1f} GB of weights > {MEMORY_SHARE:.0%} of the {limit / 1e9:.1f} GB available"
    return None


def start(model_id: str, on_done: Callable[[Prefetch], None] | None = None,
          available: int | None = None) -> Prefetch:
    """Start reading ``model_id``'s safetensors files on a daemon thread (module docstring); returns its record at
    once. ``available``: the memory to size against (default: :func:`available_memory_bytes`). Raises
    :class:`model_server.switches.SwitchValueError` for a bad ``MODEL_SERVER_PREFETCH_WEIGHTS``."""
    job = Prefetch()
    job.skipped = _why_not(job, model_id, available) if flag(SWITCH) is not False else f"{SWITCH}=0"
    if job.skipped is None:
        threading.Thread(target=_read_all, args=(job, job.files, on_done), name="weights-prefetch",
                         daemon=True).start()
        return job
    log.info("weights prefetch skipped: %s", job.skipped)
    job._done.set()
    return job
