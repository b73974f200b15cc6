"""The model server's compile cache: where it lives, and seeding it from a cache shipped in the container image.

Owns the folder ``serve`` keeps torch.compile's (inductor) and Triton's caches in (:func:`configure`; torch's bytecode
goes in its ``bytecode/`` where the install shipped none, :mod:`model_server.bytecode_cache`), the
manifest a filled cache carries (:func:`write_manifest`, :func:`read_manifest`) and copying a shipped seed
into the cache at start (:func:`seed`). Must NOT compile anything or start a server: filling a cache is
:mod:`model_server.compile_cache_fill`'s.

Why a seed: a cache on the pod's own disk (or a fresh PersistentVolumeClaim) is empty on the first start on a
node, and that start compiles every kernel (34.6-45.7 s to the first token on an H200 against 5.4-6.8 s with a
filled cache, docs/benchmarks.md). ``model-server compile-cache fill`` fills a folder on the target card; the
image ships it (``docker/compile-cache/``, ``MODEL_SERVER_COMPILE_CACHE_SEED``) and the first start copies it
into the writable cache. Both caches are keyed by content (Triton: the kernel's source, options and target;
inductor: the graph and the versions), so a copy made at another path is reused as is; a seed made with other
torch or Triton versions could only miss, so it is not copied.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MANIFEST = "edge-eval-compile-cache.json"
SKIP_DIRS = {"locks"}                    # inductor's lock files: per host, never copied
MARKER_PREFIX = ".seeded-"
TRITON_SUBDIR = "triton"                 # Triton's cache inside the inductor folder (configure's default)
BYTECODE_SUBDIR = "bytecode"             # model_server.bytecode_cache's folder inside it (its SUBDIR)


def default_dir() -> str:
    """``MODEL_SERVER_COMPILE_CACHE`` or ``~/.cache/edge-eval/torchinductor``."""
    return os.environ.get("MODEL_SERVER_COMPILE_CACHE") or str(Path.home() / ".cache" / "edge-eval" / "torchinductor")


def configure() -> Path:
    """Point torch.compile's inductor cache (``TORCHINDUCTOR_CACHE_DIR``) and Triton's (``TRITON_CACHE_DIR``, the
    INT4 and decode attention kernels) into one persistent folder, :func:`default_dir` (an explicit
    ``TORCHINDUCTOR_CACHE_DIR`` / ``TRITON_CACHE_DIR`` wins). Returns the inductor folder. Call before torch compiles."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", default_dir())
    os.environ.setdefault("TRITON_CACHE_DIR", str(Path(os.environ["TORCHINDUCTOR_CACHE_DIR"]) / TRITON_SUBDIR))
    return Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])


def versions() -> dict[str, str | None]:
    """The installed torch and Triton versions (package metadata; imports neither)."""
    out: dict[str, str | None] = {}
    for name in ("torch", "triton"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def cache_files(root: Path) -> list[Path]:
    """Every cache file under ``root`` (relative paths, sorted), without lock folders, the manifest or markers."""
    if not root.is_dir():
        return []
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        for name in filenames:
            if name == MANIFEST or name.startswith(MARKER_PREFIX) or name.endswith(".tmp"):
                continue
            out.append((Path(dirpath) / name).relative_to(root))
    return sorted(out)


def write_manifest(root: Path, facts: dict[str, Any]) -> dict[str, Any]:
    """Write ``root/edge-eval-compile-cache.json``: ``facts`` (device, model, ...), the versions, file count and
    bytes (and how many of the files are torch's bytecode). Returns what was written."""
    files = cache_files(root)
    manifest = {"format": 1, **versions(), **facts, "files": len(files),
                "bytes": sum((root / f).stat().st_size for f in files),
                # torch's compiled Python (model_server.bytecode_cache), where the filling install shipped none
                "bytecode_files": sum(1 for f in files if f.parts[0] == BYTECODE_SUBDIR)}
    tmp = root / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, root / MANIFEST)
    return manifest


def read_manifest(root: Path) -> dict[str, Any] | None:
    """The manifest of a filled cache, None when there is none. Raises ValueError (one line) when unreadable."""
    path = root / MANIFEST
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a compile cache manifest ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a compile cache manifest (not an object)")
    return data


@dataclass
class SeedResult:
    """What :func:`seed` did; ``/info`` reports it under ``compile_cache``."""
    cache_dir: str
    seed_dir: str | None = None
    copied_files: int = 0
    present_files: int = 0               # already in the cache (never overwritten)
    skipped: str | None = None           # why nothing was copied, one line
    seed_device: str | None = None       # the card the seed was filled on (manifest)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def seed(cache_dir: Path, seed_dir: Path | None, triton_dir: Path | None = None) -> SeedResult:
    """Copy a filled cache's files (``model-server compile-cache fill``) into ``cache_dir`` where absent.

    A filled cache keeps Triton's files in its ``triton/`` folder (:func:`configure`'s default); they go to
    ``triton_dir`` (the ``TRITON_CACHE_DIR`` this start uses; default ``cache_dir / "triton"``), where Triton
    looks for them.

    Never overwrites a file, never raises: an unusable seed is skipped with the reason in the result (and one
    log line). Skipped when the seed has no manifest, or was made with another torch or Triton version. Each
    file is copied to a temporary name and renamed, so a start killed mid-copy leaves no half file; a marker
    named after the manifest's hash makes the next start with the same seed skip the walk."""
    result = SeedResult(str(cache_dir), str(seed_dir) if seed_dir else None)
    if seed_dir is None:
        return result
    try:
        manifest = read_manifest(seed_dir)
    except ValueError as exc:
        return _skip(result, str(exc))
    if manifest is None:
        return _skip(result, f"{seed_dir} holds no {MANIFEST} (not filled)", quiet=True)
    result.seed_device = manifest.get("device")
    have = versions()
    for name in ("torch", "triton"):
        if manifest.get(name) != have[name]:
            return _skip(result, f"seed made with {name} {manifest.get(name)}, this is {have[name]}: not copied")
    digest = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:16]
    marker = cache_dir / (MARKER_PREFIX + digest)
    if marker.exists():
        result.present_files = int(manifest.get("files") or 0)
        return result
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        for rel in cache_files(seed_dir):
            dst = (triton_dir.joinpath(*rel.parts[1:]) if triton_dir is not None and rel.parts[0] == TRITON_SUBDIR
                   else cache_dir / rel)
            if dst.exists():
                result.present_files += 1
                continue
            dst.parent.mkdir(parents=True, exist_ok=True)
            tmp = dst.with_name(dst.name + f".{os.getpid()}.tmp")
            shutil.copyfile(seed_dir / rel, tmp)
            os.replace(tmp, dst)
            result.copied_files += 1
        marker.write_text(json.dumps(manifest, sort_keys=True) + "\n")
    except OSError as exc:
        return _skip(result, f"seeding {cache_dir} from {seed_dir} stopped: {exc.strerror or exc}"
                             f"{': ' + str(exc.filename) if exc.filename else ''}")
    log.info("compile cache %s: %d file(s) copied from the seed %s (filled on %s), %d already there",
             cache_dir, result.copied_files, seed_dir, result.seed_device or "an unknown device", result.present_files)
    return result


def _skip(result: SeedResult, why: str, quiet: bool = False) -> SeedResult:
    result.skipped = why
    (log.info if quiet else log.warning)("compile cache seed skipped: %s", why)
    return result


def seed_from_environment() -> SeedResult:
    """:func:`seed` with ``MODEL_SERVER_COMPILE_CACHE_SEED`` (unset or empty: nothing to do) into the configured
    caches (:func:`configure` first): inductor's and Triton's (``TRITON_CACHE_DIR``, wherever it points)."""
    raw = os.environ.get("MODEL_SERVER_COMPILE_CACHE_SEED", "").strip()
    cache = Path(os.environ.get("TORCHINDUCTOR_CACHE_DIR") or default_dir())
    triton = os.environ.get("TRITON_CACHE_DIR")
    return seed(cache, Path(raw) if raw else None, Path(triton) if triton else None)
