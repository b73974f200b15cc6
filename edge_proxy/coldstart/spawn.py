"""Starting a backend command: split it (``{port}``/``{host}`` filled, no shell), check that it can
be executed, check that the port is free, the restart backoff, and relaying the child's output with
a ``[backend PID]`` prefix.

Owns: the pure and one-shot parts of spawning. Must not: keep process state, signal processes or
decide when to start or stop one (:mod:`edge_proxy.coldstart.supervisor` does).
"""
from __future__ import annotations

import asyncio
import os
import re
import shlex
import shutil
import sys
from typing import Any

PORT_CHECK_TIMEOUT_SECONDS = 0.5


class SpawnError(Exception):
    """The backend command could not be started (not found, not executable, bad command)."""


def build_argv(command: str, host: str, port: int) -> list[str]:
    """Split ``command`` like a shell would (no expansion) and fill ``{port}``/``{host}``."""
    try:
        argv = shlex.split(command)
    except ValueError as exc:
        raise SpawnError(f"cannot parse spawn command: {exc}") from None
    if not argv:
        raise SpawnError("spawn command is empty")
    return [a.replace("{port}", str(port)).replace("{host}", host) for a in argv]


def check_executable(argv0: str) -> None:
    """SpawnError unless ``argv0`` names an executable file (directly or on PATH)."""
    path = argv0 if os.sep in argv0 else shutil.which(argv0)
    if path is None or not os.path.exists(path):
        raise SpawnError(f"cannot start backend {argv0!r}: No such file or directory")
    if os.path.isdir(path) or not os.access(path, os.X_OK):
        raise SpawnError(f"cannot start backend {argv0!r}: Permission denied")


async def port_in_use(host: str, port: int, timeout: float = PORT_CHECK_TIMEOUT_SECONDS) -> bool:
    """True when something accepts TCP connections on ``host:port`` now."""
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except (OSError, asyncio.TimeoutError):
        return False
    writer.close()
    return True


def backoff_seconds(failures: int, base: float = 1.0, cap: float = 60.0) -> float:
    """Delay before the next start after ``failures`` consecutive failures:
    ``0`` for none, else ``min(cap, base * 2**(failures-1))`` seconds."""
    if failures <= 0:
        return 0.0
    return min(cap, base * 2 ** (failures - 1))


async def relay_output(stream: asyncio.StreamReader, prefix: str, out: Any = None) -> None:
    """Copy a child's output to ``out`` (default: this process's stderr) line by line, each line
    prefixed, so it never mixes unmarked into what else is written there (the JSON access log).
    Carriage returns (progress bars) end a line too; blank lines are dropped; a line longer than
    64 KiB is cut."""
    out = out or sys.stderr
    buf = b""
    while True:
        chunk = await stream.read(65536)
        if not chunk:
            break
        buf += chunk
        *lines, buf = re.split(rb"[\r\n]", buf)
        if len(buf) > 65536:
            lines.append(buf)
            buf = b""
        text = "".join(f"{prefix}{x.decode(errors='replace')}\n" for x in lines if x.strip())
        if text:
            out.write(text)
            out.flush()
    if buf.strip():
        out.write(f"{prefix}{buf.decode(errors='replace')}\n")
        out.flush()
