"""model_server/data/int4_mma.cu compiled by NVRTC (the compiler the server uses at run time) without a GPU.

Every configuration :func:`int4_mma.choose_config` returns for the decode row counts the server routes to the kernel
is compiled for sm_80 (A100, the kernel's floor) and sm_90 (H100/H200) by :func:`int4_mma_build.compile_cubin`, the
function the server compiles it with (here with the test extra's libnvrtc); the cubin's resource usage (Triton's
bundled cuobjdump) must show no spills, and its SASS the bf16 tensor-core MMA. A source that only nvcc accepts (a
header NVRTC lacks, a host-only construct) fails here."""
from __future__ import annotations

import ctypes
import re
import subprocess
from pathlib import Path

import nvidia                     # the test extra's nvidia-cuda-nvrtc (a namespace package)
import pytest
import triton                     # its bundled cuobjdump reads the cubins

from model_server import int4_mma, int4_mma_build
from model_server.int4 import MMA_MAX_ROWS


def _libnvrtc() -> ctypes.CDLL:
    for root in nvidia.__path__:
        found = sorted(Path(root).glob("cu*/lib/libnvrtc.so*"))
        if found:
            return ctypes.CDLL(str(found[0]))
    pytest.fail("nvidia-cuda-nvrtc is a test dependency (pyproject's test extra); libnvrtc not found")


def _cuobjdump() -> Path:
    found = sorted(Path(triton.__file__).parent.glob("backends/nvidia/bin/cuobjdump"))
    if not found:
        pytest.fail("Triton's bundled cuobjdump not found")
    return found[0]


def _served_configs() -> list[int4_mma.Config]:
    shapes = [(3072, 2048), (2048, 2048), (16384, 2048), (2048, 8192), (128256, 2048)]
    out: list[int4_mma.Config] = []
    for m in range(1, MMA_MAX_ROWS + 1):
        for n, k in shapes:
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
    names = sorted({cfg.name() for cfg in _served_configs()})
    assert len(names) >= 2
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
