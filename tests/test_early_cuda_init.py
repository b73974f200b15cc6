"""``MODEL_SERVER_EARLY_CUDA_INIT=1``: CUDA's driver initialised on a thread while torch imports (model_server.gpu.
start_driver_init), and the startup marks that show where a start's imports go (/info ``startup``)."""
from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
import threading
import urllib.request

from model_server.gpu import start_driver_init
from tests.net_support import free_port, stop_process, wait_http_ok


def test_the_thread_calls_cuinit_once(monkeypatch):
    calls = []

    class Driver:
        def __init__(self, name):
            calls.append(name)

        def cuInit(self, flags):      # noqa: N802 - the driver's name
            calls.append(flags)
            return 0

    monkeypatch.setattr(ctypes, "CDLL", Driver)
    t = start_driver_init()
    t.join(10)
    assert not t.is_alive() and t.daemon and calls == ["libcuda.so.1", 0]


def test_a_host_without_libcuda_is_left_alone(monkeypatch):
    def missing(name):
        raise OSError(f"{name}: cannot open shared object file")

    errors = []
    monkeypatch.setattr(ctypes, "CDLL", missing)
    monkeypatch.setattr(threading, "excepthook", lambda args: errors.append(args.exc_value))
    t = start_driver_init()
    t.join(10)
    assert not t.is_alive() and errors == []


def _serve(tiny_model_dir: str, value: str, port: int, stderr=subprocess.PIPE) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "model_server", "serve", tiny_model_dir, "--device", "auto",
                             "--host", "127.0.0.1", "--port", str(port)],
                            env={**os.environ, "MODEL_SERVER_EARLY_CUDA_INIT": value, "PYTHONUNBUFFERED": "1"},
                            stdout=subprocess.DEVNULL, stderr=stderr, text=True)


def test_a_bad_value_is_a_one_line_error(tiny_model_dir):
    proc = _serve(tiny_model_dir, "yes", free_port())
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        stop_process(proc)                  # a server that took the value would still be running
    assert proc.returncode != 0 and "MODEL_SERVER_EARLY_CUDA_INIT must be 0 or 1" in err.splitlines()[-1]
    assert "Traceback" not in err


def test_serve_with_it_on_a_host_without_a_gpu_marks_its_startup(tiny_model_dir):
    port = free_port()
    proc = _serve(tiny_model_dir, "1", port, stderr=subprocess.DEVNULL)
    try:
        wait_http_ok(f"http://127.0.0.1:{port}/health", 120, proc=proc)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/info", timeout=10) as r:
            info = json.load(r)
        st = info["startup"]
        assert info["devices"][0]["type"] == "cpu"
        assert (st["process_start"] <= st["listening"] <= st["torch_imported"] <= st["device_ready"]
                <= st["load_start"] <= st["load_end"] <= st["ready"])
    finally:
        stop_process(proc)
