"""Compiling the CUDA kernels (``model_server/data/int4_mma.cu``, and ``gemv_bf16.cu`` for :mod:`model_server.gemv_bf16`)
at run time and loading them on a device.

Owns: NVRTC (torch's helper, or :func:`compile_cubin` through ctypes where that one needs a CUDA toolkit: the
source includes no headers), the cubin cache in the compile cache (``int4_mma/`` under ``TORCHINDUCTOR_CACHE_DIR``, so
an image's seed carries it), loading a module with the device's context current (:func:`kernel`) and the
shared-memory opt-in (:func:`allow_smem`). What to launch and how is :mod:`model_server.int4_mma`'s.
"""
from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

SOURCE_PATH = Path(__file__).with_name("data") / "int4_mma.cu"


def available(device: torch.device | str | None = None) -> bool:
    """CUDA with compute capability >= 8.0 (bf16 ``mma.sync``) and torch's NVRTC loader and module loader present."""
    if not torch.cuda.is_available():
        return False
    dev = torch.device(device if device is not None else "cuda")
    if dev.type != "cuda" or torch.cuda.get_device_capability(dev) < (8, 0):
        return False
    from torch.cuda import _utils
    return hasattr(_utils, "_get_nvrtc_library") and hasattr(_utils, "_cuda_load_module")


def _cache_dir() -> Path | None:
    """``int4_mma/`` in the compile cache ``serve`` configures (``TORCHINDUCTOR_CACHE_DIR``, model_server.compile_cache;
    so an image's seeded cache carries the cubins too); None outside it (benchmarks compile each run)."""
    root = os.environ.get("TORCHINDUCTOR_CACHE_DIR", "").strip()
    return Path(root) / "int4_mma" if root else None


def device_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def compile_cubin(lib: Any, src: str, name: str, arch: str) -> tuple[bytes, str]:
    """NVRTC (``lib``, a loaded libnvrtc) compiles ``src`` for ``sm_<arch>``: ``(cubin, lowered name of name)``. The
    source includes no headers, so no CUDA toolkit is needed (torch's own NVRTC helper adds CUDA_HOME's include
    directory and fails without one, as in a container with the pip CUDA libraries only). RuntimeError with NVRTC's
    log when it does not compile."""
    import ctypes
    prog = ctypes.c_void_p()

    def check(rc: int, what: str) -> None:
        if rc != 0:
            raise RuntimeError(f"NVRTC {what} failed ({rc})")

    check(lib.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), b"int4_mma.cu", 0, None, None), "create")
    try:
        check(lib.nvrtcAddNameExpression(prog, name.encode()), "name")
        opts = [f"--gpu-architecture=sm_{arch}".encode(), b"-std=c++17"]
        rc = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
        if rc != 0:
            size = ctypes.c_size_t()
            lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
            log_buf = ctypes.create_string_buffer(size.value)
            lib.nvrtcGetProgramLog(prog, log_buf)
            raise RuntimeError(f"NVRTC could not compile {name}: {log_buf.value.decode(errors='replace')[-2000:]}")
        size = ctypes.c_size_t()
        check(lib.nvrtcGetCUBINSize(prog, ctypes.byref(size)), "cubin size")
        cubin = ctypes.create_string_buffer(size.value)
        check(lib.nvrtcGetCUBIN(prog, cubin), "cubin")
        lowered = ctypes.c_char_p()
        check(lib.nvrtcGetLoweredName(prog, name.encode(), ctypes.byref(lowered)), "lowered name")
        return cubin.raw, (lowered.value or b"").decode()
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


def read_cached(path: Path) -> tuple[bytes, str] | None:
    """A cached ``(cubin, lowered name)`` at ``path`` (``.cubin``, its name in ``.name``), or None when either is
    missing, unreadable or not whole (an empty name, a cubin that is not an ELF file): compile it again then."""
    try:
        mangled = path.with_suffix(".name").read_text().strip()
        cubin = path.read_bytes()
    except (OSError, UnicodeDecodeError):
        return None
    return (cubin, mangled) if mangled and cubin.startswith(b"\x7fELF") else None


def store_cached(path: Path, cubin: bytes, mangled: str) -> None:
    """Write a compiled kernel to the cache; never raises (a read-only cache: compile again next start). Each file is
    written whole under a temporary name and renamed, the name before the cubin, so processes sharing the cache (pods
    on one volume) never read half an entry: :func:`read_cached` looks for the cubin, which comes last."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        for target, data in ((path.with_suffix(".name"), mangled.encode()), (path, cubin)):
            tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
            tmp.write_bytes(data)
            tmp.replace(target)
    except OSError:
        pass


@lru_cache(maxsize=None)
def kernel(name: str, index: int, source: Path = SOURCE_PATH) -> Any:
    """The compiled kernel ``name`` (a template instance in ``source``, e.g. a :meth:`Config.name`) on a device: NVRTC
    once per configuration and process, the cubin kept under the compile cache (:func:`_cache_dir`) for the next start. NVRTC through torch's helper, or,
    where that fails (it needs CUDA_HOME for an include path this source does not use), through :func:`compile_cubin`
    (not yet run on a GPU; CI compiles every served config through it). A cached cubin the driver refuses is
    compiled again."""
    from torch.cuda import _utils
    src = source.read_text()
    capability = torch.cuda.get_device_capability(index)
    arch = f"{capability[0]}{capability[1]}"
    key = hashlib.sha256(f"{src}\0{name}\0{arch}\0{torch.version.cuda}".encode()).hexdigest()[:24]
    cache = _cache_dir()
    path = None if cache is None else cache / f"{key}.cubin"
    cached = None if path is None else read_cached(path)
    if cached is not None:
        try:
            return _load(index, *cached)
        except RuntimeError:                           # e.g. a cubin damaged on disk: compile it again
            pass
    try:                                               # torch's helper: what the H100 runs of 2026-12-05 used
        cubin, mangled = _utils._nvrtc_compile(src, name, compute_capability=arch, nvcc_options=["-std=c++17"])
    except (OSError, RuntimeError, TypeError, AttributeError):   # e.g. no CUDA_HOME for its include path
        cubin, mangled = compile_cubin(_utils._get_nvrtc_library(), src, name, arch)
    fn = _load(index, cubin, mangled)
    if path is not None:
        store_cached(path, cubin, mangled)
    return fn


def _load(index: int, cubin: bytes, mangled: str) -> Any:
    from torch.cuda import _utils
    with torch.cuda.device(index):
        torch.cuda.synchronize(index)       # makes the device's primary context current on this thread: the
        return _utils._cuda_load_module(cubin, [mangled])[mangled]   # driver's module load needs one (a fresh
                                                                     # process at load time has none yet)


def allow_smem(fn: Any, smem: int) -> None:
    """Opt the kernel in to ``smem`` bytes of dynamic shared memory (above the default 48 KB) once."""
    if getattr(fn, "_max_shared_mem_bytes", 0) >= smem or getattr(fn, "_int4_mma_smem", 0) >= smem:
        return
    if hasattr(fn, "set_shared_memory_config"):
        fn.set_shared_memory_config(smem)
    else:                                              # older torch: the driver call itself
        import ctypes

        from torch.cuda import _utils
        _utils._check_cuda(_utils._get_gpu_runtime_library().cuFuncSetAttribute(
            fn.func, 8, ctypes.c_int(smem)))           # CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
    fn._int4_mma_smem = smem
