"""model_server/data/gemv_bf16.cu compiled by NVRTC without a GPU (as the server compiles it at run time), and the
install switch's routing on CPU.

Every configuration of :data:`gemv_bf16.CONFIGS` (1..8 rows of x) compiles for sm_80 and sm_90 through
:func:`int4_mma_build.compile_cubin` with no spills (no local memory, no stack) and with the streaming 16-byte loads and
FMA it is built from in its SASS. The multi-row logic on CPU (choice, switch, routing, :func:`gemv_bf16.emulate`) is
tests/test_gemv_bf16_rows.py's. Its numbers on a GPU are ``benchmarks/gemv_bf16_bench.py``'s (checked there against
fp32)."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from model_server import gemv_bf16, int4_mma_build

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import int4_mma_sass  # noqa: E402


@pytest.mark.parametrize("arch", ["80", "90"])
def test_every_config_compiles_without_spills(tmp_path: Path, arch: str) -> None:
    try:
        lib, objdump = int4_mma_sass.libnvrtc(), int4_mma_sass.cuobjdump()
    except int4_mma_sass.ToolMissing as exc:
        pytest.fail(f"{exc}: a test dependency")
    src = gemv_bf16.SOURCE_PATH.read_text()
    for cfg in gemv_bf16.CONFIGS:
        cubin, mangled = int4_mma_build.compile_cubin(lib, src, cfg.name(), arch)
        path = tmp_path / f"{arch}_{cfg.rpw}_{cfg.warps}_{cfg.unroll}_{cfg.rows}.cubin"
        path.write_bytes(cubin)
        res = subprocess.run([str(objdump), "-res-usage", str(path)], capture_output=True, text=True, timeout=60)
        usage = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", res.stdout)
        assert usage, res.stdout + res.stderr
        regs, stack, shared, local = (int(v) for v in usage.groups())
        assert 0 < regs <= 255 and local == 0 and stack == 0 and shared == 0, (cfg, arch, usage.group(0))
        sass = subprocess.run([str(objdump), "-sass", str(path)], capture_output=True, text=True, timeout=60).stdout
        assert "LDG.E.128" in sass and "FFMA" in sass and "SHFL.BFLY" in sass, (cfg, arch)


def test_choose_and_grid() -> None:
    for n, k in ((3072, 2048), (2048, 8192), (128256, 2048), (7, 8)):
        cfg = gemv_bf16.choose(n, k)
        assert cfg in gemv_bf16.CONFIGS
        assert cfg.grid(n) * cfg.rpw * cfg.warps >= n > (cfg.grid(n) - 1) * cfg.rpw * cfg.warps


def test_install_leaves_cpu_and_biased_linears_alone() -> None:
    model = nn.Sequential(nn.Linear(16, 8, bias=False).to(torch.bfloat16), nn.Linear(8, 4))
    assert gemv_bf16.install(model) == 0                 # CPU weights: not usable, forward unchanged
    x = torch.randn(1, 16, dtype=torch.bfloat16)
    assert torch.equal(model[0](x), torch.nn.functional.linear(x, model[0].weight))


def test_the_engine_switch_is_a_no_op_off_cuda() -> None:
    from model_server.engines.fast.factory import install_gemv
    from tests.fast_engine_support import _engine, _tiny
    eng = _engine(_tiny("llama"))
    assert install_gemv(eng) == 0
    assert all("forward" not in vars(m) for m in eng.runner.model.modules())   # nothing rerouted


def test_the_switch_reads_on_off_and_rejects_other_values(monkeypatch) -> None:
    from model_server.engines.fast import factory
    from model_server.switches import SwitchValueError
    monkeypatch.delenv("MODEL_SERVER_FAST_GEMV", raising=False)
    assert factory.gemv_switch() is None                 # unset: the default (the GEMV on CUDA)
    monkeypatch.setenv("MODEL_SERVER_FAST_GEMV", "0")
    assert factory.gemv_switch() is False
    monkeypatch.setenv("MODEL_SERVER_FAST_GEMV", "yes")
    with pytest.raises(SwitchValueError):
        factory.gemv_switch()


def test_from_loaded_asks_for_the_gemv_unless_switched_off(monkeypatch) -> None:
    from types import SimpleNamespace

    from model_server.engines.fast import factory
    from tests.fast_engine_support import _tiny
    calls: list[tuple[object, int]] = []
    monkeypatch.setattr(factory, "install_gemv", lambda eng, max_rows: calls.append((eng, max_rows)))
    loaded = SimpleNamespace(model=_tiny("llama"), eos_token_ids=[0], context_length=64)
    monkeypatch.delenv("MODEL_SERVER_FAST_GEMV", raising=False)
    monkeypatch.delenv("MODEL_SERVER_FAST_GEMV_ROWS", raising=False)
    eng = factory.from_loaded(loaded, max_batch=2, max_total_tokens=32)
    assert calls == [(eng, 1)]                           # one row unless MODEL_SERVER_FAST_GEMV_ROWS says more
    assert eng.stats().extra["gemv_linears"] == 0.0      # off CUDA nothing is routed; the stat says so
    monkeypatch.setenv("MODEL_SERVER_FAST_GEMV_ROWS", "8")
    eng = factory.from_loaded(loaded, max_batch=2, max_total_tokens=32)
    assert calls[-1] == (eng, 8)
    monkeypatch.setenv("MODEL_SERVER_FAST_GEMV", "0")
    factory.from_loaded(loaded, max_batch=2, max_total_tokens=32)
    assert len(calls) == 2
