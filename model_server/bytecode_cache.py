"""Where the server's compiled Python bytecode lives when the install shipped none for torch.

An installer that does not compile bytecode (``uv`` without ``--compile-bytecode``, ``pip install --no-compile``)
leaves torch's ~2,100 modules without a ``.pyc``; with ``PYTHONDONTWRITEBYTECODE=1`` (set by our image, by many
others, and by the H100 host of docs/benchmarks.md) Python then compiles them again on every start and keeps
nothing. On that host ``import torch`` took 5.7 s compiling and 2.4 s from cached bytecode (benchmarks/import_torch.py): the
largest part of a cold start's 8 s. :func:`configure` keeps that bytecode in a folder next to the compile cache
(``sys.pycache_prefix``, writing allowed for this process only), so the second start, and every start seeded
from a ``model-server compile-cache fill`` made on such an install, reads it.

``MODEL_SERVER_BYTECODE_CACHE``: unset or ``auto``: only where torch has no bytecode of its own for this
interpreter; ``1``: always (beside the compile cache); ``0``: never; a folder: always, there. Owns that decision and nothing else: call it before torch
is imported (``serve`` does, after seeding the compile cache).
"""
from __future__ import annotations

import importlib.util
import logging
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from model_server.compile_cache import BYTECODE_SUBDIR as SUBDIR   # inside the compile cache: persists, seeds with it

log = logging.getLogger(__name__)

ENV = "MODEL_SERVER_BYTECODE_CACHE"


@dataclass
class BytecodeCache:
    """What :func:`configure` chose; ``/info`` reports it under ``bytecode_cache``."""
    mode: str                       # "installed" (the package's own .pyc), "cache" (dir is used), "off"
    dir: str | None = None
    reason: str = ""                # one line: why this mode

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def has_own_bytecode(package: str = "torch") -> bool | None:
    """Whether ``package``'s ``__init__`` has a cached ``.pyc`` for this interpreter beside it (``__pycache__``);
    ``None`` when the package is not installed. Finds the package without importing it."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):     # a broken install, or a module imported without a spec
        return None
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        return None
    origin = Path(spec.origin)
    return (origin.parent / "__pycache__" / f"{origin.stem}.{sys.implementation.cache_tag}.pyc").exists()


def _use(folder: Path, reason: str) -> BytecodeCache:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if not os.access(folder, os.W_OK):
            raise PermissionError(f"{folder} is not writable")
    except OSError as exc:
        why = f"bytecode cache {folder} not used: {exc.strerror or exc}"
        log.warning("%s", why)
        return BytecodeCache("off", str(folder), why)
    sys.pycache_prefix = str(folder.resolve())
    sys.dont_write_bytecode = False     # this process only: PYTHONDONTWRITEBYTECODE stays as set for children
    log.info("bytecode cache %s (%s)", sys.pycache_prefix, reason)
    return BytecodeCache("cache", sys.pycache_prefix, reason)


def configure(cache_dir: Path, package: str = "torch", env: dict[str, str] | None = None) -> BytecodeCache:
    """Apply ``MODEL_SERVER_BYTECODE_CACHE`` for this process (module docstring): in ``auto``, bytecode goes to
    ``cache_dir / "bytecode"`` when ``package`` has none of its own. Never raises: a folder it cannot create or
    write is one warning and mode ``off``."""
    raw = (os.environ if env is None else env).get(ENV, "").strip()
    if raw == "0":
        return BytecodeCache("off", None, f"{ENV}=0")
    if raw == "1":
        return _use(cache_dir / SUBDIR, f"{ENV}=1")
    if raw not in ("", "auto"):
        return _use(Path(raw), f"{ENV}={raw}")
    if sys.pycache_prefix is not None:          # PYTHONPYCACHEPREFIX / -X pycache_prefix: the operator's choice stands
        return BytecodeCache("off", sys.pycache_prefix, "a pycache prefix is already set for this interpreter")
    own = has_own_bytecode(package)
    if own is None:
        return BytecodeCache("off", None, f"{package} is not installed")
    if own:
        return BytecodeCache("installed", None, f"{package} has bytecode of its own")
    return _use(cache_dir / SUBDIR, f"{package} has no bytecode of its own for {sys.implementation.cache_tag}")
