"""Shared fixtures. ADD fixtures with small edits; never rewrite this file.

Model server (issue 2):
* ``tiny_model_dir`` (session): ``model-server synth DIR --preset tiny --seed 0``.
* ``model_server`` (session): ``model-server serve tiny_model_dir --port <free> --device cpu``
  running as a subprocess; yields a :class:`ModelServerProcess` (``.url``, ``.proc``, ``.port``).
* ``start_model_server(model_dir, *args)``: a context manager for tests that need their own server.
* helpers ``free_port()`` and ``wait_http_ok(url, timeout)``.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from tests.net_support import free_port, stop_process, wait_http_ok

# Triton runs kernels on the CPU only when its interpreter is chosen before Triton is first imported (torch
# imports it when it compiles, and the kernels of triton.language are built then). Machines without an
# NVIDIA GPU (CI) run the INT4 Triton kernel's tests (tests/test_int4_triton.py) in it.
if subprocess.run(["sh", "-c", "command -v nvidia-smi && nvidia-smi -L"], capture_output=True).returncode != 0:
    os.environ.setdefault("TRITON_INTERPRET", "1")


@dataclass
class ModelServerProcess:
    proc: subprocess.Popen
    port: int
    model_dir: str
    log_path: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, timeout: float = 20.0) -> int | None:
        return stop_process(self.proc, timeout)


@contextlib.contextmanager
def start_model_server(model_dir: str, *extra_args: str, ready_timeout: float = 120.0,
                       wait_ready: bool = True) -> Iterator[ModelServerProcess]:
    """Run ``model-server serve model_dir --device cpu`` on a free port; stop it (SIGTERM) afterwards."""
    port = free_port()
    log = tempfile.NamedTemporaryFile(prefix="model_server_", suffix=".log", delete=False)
    cmd = [sys.executable, "-m", "model_server", "serve", str(model_dir), "--port", str(port),
           "--host", "127.0.0.1", "--device", "cpu", *extra_args]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    server = ModelServerProcess(proc=proc, port=port, model_dir=str(model_dir), log_path=log.name)
    try:
        if wait_ready:
            try:
                wait_http_ok(f"{server.url}/health", timeout=ready_timeout, proc=proc)
            except (TimeoutError, RuntimeError) as exc:
                raise RuntimeError(f"model server did not become ready: {exc}\n{server.log()[-3000:]}") from None
        yield server
    finally:
        server.stop()
        log.close()
        with contextlib.suppress(OSError):
            os.unlink(log.name)


def synth_qwen2_with_biases(dst) -> str:
    """A ``tiny-qwen2`` directory at ``dst`` whose q/k/v biases are random (the preset's are zero), so they matter."""
    import torch
    from safetensors.torch import load_file, save_file

    subprocess.run([sys.executable, "-m", "model_server", "synth", str(dst), "--preset", "tiny-qwen2", "--seed", "0",
                    "--quiet"], check=True, capture_output=True, timeout=300)
    state = load_file(f"{dst}/model.safetensors")
    g = torch.Generator().manual_seed(1)
    for k in state:
        if k.endswith("_proj.bias"):
            state[k] = torch.randn(state[k].shape, generator=g) * 0.5
    save_file(state, f"{dst}/model.safetensors", metadata={"format": "pt"})
    return str(dst)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A ``model-server synth --preset tiny --seed 0`` directory, built once per session."""
    out = tmp_path_factory.mktemp("tiny_model") / "tiny"
    subprocess.run([sys.executable, "-m", "model_server", "synth", str(out), "--preset", "tiny",
                    "--seed", "0", "--quiet"], check=True, capture_output=True, timeout=300)
    return str(out)


@pytest.fixture(scope="session")
def model_server(tiny_model_dir) -> Iterator[ModelServerProcess]:
    """One tiny-model server for the whole session (CPU, transformers engine)."""
    with start_model_server(tiny_model_dir, "--max-batch", "16") as server:
        yield server


# ------------------------------------------------------------------ skipped tests in CI are loud
# A test skipped in CI is a test that does not exist (issue 18): with CI=true every skip is listed in
# a banner at the end of the run, with its reason; EDGE_EVAL_FAIL_ON_SKIP=1 also fails the run.
def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:  # noqa: ARG001
    if os.environ.get("CI", "").lower() not in ("1", "true", "yes"):
        return
    skipped = terminalreporter.stats.get("skipped", [])
    if not skipped:
        return
    tr = terminalreporter
    tr.write_sep("!", f"{len(skipped)} TEST(S) SKIPPED IN CI: each one is a test that did not run", red=True, bold=True)
    for rep in skipped:
        reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
        tr.write_line(f"SKIPPED IN CI: {rep.nodeid}: {reason}", red=True, bold=True)
    tr.write_sep("!", "install what they need in scripts/quickstart.sh or the pyproject test extra", red=True)


def pytest_sessionfinish(session, exitstatus) -> None:
    if os.environ.get("EDGE_EVAL_FAIL_ON_SKIP") == "1" and exitstatus == 0:
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None and reporter.stats.get("skipped"):
            session.exitstatus = 1
