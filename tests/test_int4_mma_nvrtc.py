"""model_server/data/int4_mma.cu compiled by NVRTC (the compiler the server uses at run time) without a GPU.

Every configuration :func:`int4_mma.choose_config` returns for the decode row counts the server routes to the kernel
is compiled for sm_80 (A100, the kernel's floor) and sm_90 (H100/H200) by :func:`int4_mma_build.compile_cubin`, the
function the server compiles it with (here with the test extra's libnvrtc); the cubin's resource usage (Triton's
bundled cuobjdump) must show no spills, and its SASS the bf16 tensor-core MMA. A source that only nvcc accepts (a
header NVRTC lacks, a host-only construct) fails here. The cubin cache (``int4_mma_build.kernel`` with torch's
helper failing, as without CUDA_HOME, so the ctypes path runs; only the driver's module load is faked): entries
round-trip, are written name first, and a torn, foreign or refused entry is compiled again, never served."""
from __future__ import annotations

import ctypes
import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest

from model_server import int4_mma, int4_mma_build
from model_server.int4 import mma_max_rows

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import int4_mma_sass  # noqa: E402  (libnvrtc from the test extra's nvidia-cuda-nvrtc, Triton's bundled cuobjdump)


def _libnvrtc() -> ctypes.CDLL:
    try:
        return int4_mma_sass.libnvrtc()
    except int4_mma_sass.ToolMissing as exc:
        pytest.fail(f"{exc}: a test dependency")


def _cuobjdump() -> Path:
    try:
        return int4_mma_sass.cuobjdump()
    except int4_mma_sass.ToolMissing as exc:
        pytest.fail(f"{exc}: a test dependency")


def _served_configs() -> list[int4_mma.Config]:
    shapes = [(3072, 2048), (2048, 2048), (16384, 2048), (2048, 8192), (128256, 2048)]
    out: list[int4_mma.Config] = []
    for n, k in shapes:
        for m in range(1, mma_max_rows(n) + 1):          # 32 rows on the wide layers
            for sms in (108, 132):
                cfg = int4_mma.choose_config(m, n, k, sms)
                if cfg not in out:
                    out.append(cfg)
    return out


def test_a_source_nvrtc_rejects_is_one_runtime_error_with_its_log() -> None:
    with pytest.raises(RuntimeError, match="(?s)could not compile.*undefined_thing"):
        src = int4_mma_build.SOURCE_PATH.read_text() + "\nint broken = undefined_thing;\n"
        int4_mma_build.compile_cubin(_libnvrtc(), src, "w4a16_mma<1,1,4,4>", "90")


@pytest.mark.parametrize("arch", ["80", "90"])
def test_every_served_config_compiles_without_spills(tmp_path: Path, arch: str) -> None:
    lib = _libnvrtc()
    served = _served_configs()
    flat = [dataclasses.replace(c, flat=1) for c in served + [int4_mma.Config(8, 1, 4, 4, 1)]]   # sweeps' variants
    kw = [int4_mma.Config(nt, r, w, 4, 1, 1, k) for nt, r, w, k in ((1, 1, 16, 4), (2, 1, 8, 2), (8, 1, 16, 4),
                                                                    (8, 2, 8, 2), (8, 2, 16, 4))]
    from model_server import int4_mma_glu       # the merged gate/up's GLU epilogue, with and without split K
    glu = [c for m in range(1, mma_max_rows(16384) + 1) for sms in (108, 132)
           if (c := int4_mma_glu.glu_config(m, 16384, 2048, sms)) is not None]
    assert {c.split for c in glu} >= {1, 4}
    names = sorted({cfg.name() for cfg in served + flat + kw + glu})
    assert len(names) >= 4
    for name in names:
        cubin, mangled = int4_mma_build.compile_cubin(lib, int4_mma_build.SOURCE_PATH.read_text(), name, arch)
        path = tmp_path / f"{arch}_{mangled}.cubin"
        path.write_bytes(cubin)
        res = subprocess.run([str(_cuobjdump()), "-res-usage", str(path)], capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        usage = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", res.stdout)
        assert usage, res.stdout
        regs, stack, _, local = (int(v) for v in usage.groups())
        # LOCAL: spilled registers (none allowed); STACK: a call's frame (sm_80's integer division helper: 8 bytes)
        assert 0 < regs <= 255 and stack <= 16 and local == 0, (name, arch, usage.group(0))
        sass = subprocess.run([str(_cuobjdump()), "-sass", str(path)], capture_output=True, text=True, timeout=60)
        assert "HMMA.16816.F32.BF16" in sass.stdout, (name, arch)


def _fake_cuda(monkeypatch, cache: Path) -> list[tuple[bytes, str]]:
    """The GPU parts of ``int4_mma_build.kernel`` replaced (capability 9.0; the module load recorded, a cubin whose
    bytes end in ``b"BAD"`` refused as the driver refuses one); NVRTC is the real one (torch's helper made to fail,
    as without CUDA_HOME)."""
    from torch.cuda import _utils
    int4_mma_build.kernel.cache_clear()
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(cache))
    monkeypatch.setattr("torch.cuda.get_device_capability", lambda index=None: (9, 0))

    def helper_fails(*_a, **_k):
        raise RuntimeError("CUDA_HOME not set")
    monkeypatch.setattr(_utils, "_nvrtc_compile", helper_fails, raising=False)
    monkeypatch.setattr(_utils, "_get_nvrtc_library", _libnvrtc, raising=False)
    loads: list[tuple[bytes, str]] = []

    def load(index: int, cubin: bytes, mangled: str) -> str:
        loads.append((cubin, mangled))
        if cubin.endswith(b"BAD"):
            raise RuntimeError("CUDA error: device kernel image is invalid")
        return mangled
    monkeypatch.setattr(int4_mma_build, "_load", load)
    return loads


def test_the_cubin_cache_round_trips_and_a_torn_or_refused_entry_is_compiled_again(monkeypatch, tmp_path) -> None:
    loads = _fake_cuda(monkeypatch, tmp_path)
    name = "w4a16_mma<1,1,4,4>"
    mangled = int4_mma_build.kernel(name, 0)                 # compiled (NVRTC) and stored
    (entry,) = (tmp_path / "int4_mma").glob("*.cubin")
    assert mangled.startswith("_Z") and int4_mma_build.read_cached(entry) == (entry.read_bytes(), mangled)
    assert sorted(p.suffix for p in entry.parent.iterdir()) == [".cubin", ".name"]     # no temporary left
    good = entry.read_bytes()
    for torn in ("", "  \n"):                                # a name half written by another process
        entry.with_suffix(".name").write_text(torn)
        assert int4_mma_build.read_cached(entry) is None
    entry.with_suffix(".name").write_text(mangled)
    entry.write_bytes(b"\0" * 64)                          # not an ELF file
    assert int4_mma_build.read_cached(entry) is None
    entry.unlink()
    assert int4_mma_build.read_cached(entry) is None
    entry.write_bytes(good + b"BAD")                         # whole on disk, but the driver refuses it
    int4_mma_build.kernel.cache_clear()
    assert int4_mma_build.kernel(name, 0) == mangled
    assert [c.endswith(b"BAD") for c, _ in loads] == [False, True, False]    # first compile, refused, compiled again
    assert entry.read_bytes() == good                        # the entry was replaced by the fresh compile
    int4_mma_build.kernel.cache_clear()
    assert int4_mma_build.kernel(name, 0) == mangled and loads[-1] == (good, mangled)   # now from the cache


def test_an_entry_is_stored_name_first_and_a_read_only_cache_is_not_an_error(monkeypatch, tmp_path) -> None:
    order: list[str] = []
    real = Path.replace
    monkeypatch.setattr(Path, "replace", lambda self, target: (order.append(Path(target).suffix), real(self, target))[1])
    int4_mma_build.store_cached(tmp_path / "k.cubin", b"\x7fELF...", "_Zname")
    assert order == [".name", ".cubin"] and int4_mma_build.read_cached(tmp_path / "k.cubin") == (b"\x7fELF...", "_Zname")
    blocked = tmp_path / "a-file"                            # the cache's folder cannot be made (as root too)
    blocked.write_text("")
    int4_mma_build.store_cached(blocked / "int4_mma" / "k.cubin", b"\x7fELF", "_Zname")     # no exception
    assert blocked.is_file()


def test_the_sass_count_reads_one_block_of_the_main_loop() -> None:
    """benchmarks/int4_mma_sass.py: one block of the 64-row configuration holds its 32 MMAs (4 k16 steps x 8 token
    tiles), the FLAT variant's span has no loop and fewer instructions than the served one's, which has its copy loop."""
    lib = _libnvrtc()
    served = int4_mma_sass.per_block(int4_mma_sass.disassemble(lib, "w4a16_mma<8,1,4,4>", "90")[0])
    flat = int4_mma_sass.per_block(int4_mma_sass.disassemble(lib, "w4a16_mma<8,1,4,4,1>", "90")[0])
    assert served["HMMA"] == flat["HMMA"] == 32 and served["loop"] and not flat["loop"]
    assert flat["instructions"] < served["instructions"] and flat["LDGSTS"] < served["LDGSTS"]
    one = int4_mma_sass.per_block(int4_mma_sass.disassemble(lib, "w4a16_mma<1,1,4,4,1>", "80")[0])
    assert one["HMMA"] == 4
    with pytest.raises(ValueError, match="main loop"):
        int4_mma_sass.per_block([(0, "NOP"), (16, "BAR.SYNC.DEFER_BLOCKING 0x0"), (32, "EXIT")])
