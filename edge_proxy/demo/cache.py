"""The demo's on-disk cache: where it lives, and how one entry (a synthesized or an adapted model)
is built atomically. An entry is complete when it holds ``.edge-eval-complete``; it is built under a
temporary name by a subprocess and renamed into place, so an interrupted build never looks cached.
Must not know what the entries contain."""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any, Callable

from edge_proxy.config import ConfigError

MARKER = ".edge-eval-complete"


def cache_root(args: argparse.Namespace) -> Path:
    """``--cache-dir``, else ``$EDGE_EVAL_CACHE``, else ``~/.cache/edge-eval``."""
    return Path(args.cache_dir or os.environ.get("EDGE_EVAL_CACHE") or Path.home() / ".cache" / "edge-eval")


def is_complete(d: Path) -> bool:
    return (d / MARKER).is_file()


def build(d: Path, command: Callable[[Path], list[str]], status: str, what: str, console: Any) -> None:
    """Run ``command(tmp)`` (which writes the entry into ``tmp``) under a status line, then mark the
    entry complete and rename it to ``d``. A failing command raises ConfigError with its last
    stderr line (``what failed: ...``) and leaves nothing behind."""
    tmp = d.with_name(d.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    with console.status(status):
        out = subprocess.run(command(tmp), capture_output=True, text=True)
    if out.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        last = (out.stderr.strip().splitlines() or ["unknown error"])[-1]
        raise ConfigError(f"{what} failed: {last}")
    (tmp / MARKER).write_text("ok\n")
    shutil.rmtree(d, ignore_errors=True)
    tmp.rename(d)
