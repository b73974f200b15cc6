"""The demo's processes: the model it serves (a cached synthesized one or ``--model-dir``), free
ports, waiting for the proxy, and stopping the proxy and any model server it leaves behind. Must
not send load or read metrics (that is :mod:`.live`)."""
from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from edge_proxy.config import ConfigError
from edge_proxy.demo import cache as demo_cache


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


def tail(path: Path, n: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def ensure_model(args: argparse.Namespace, console: Any) -> Path:
    if args.model_dir:
        d = Path(args.model_dir)
        if not (d / "config.json").is_file():
            raise ConfigError(f"--model-dir {d}: no config.json there")
        return d
    d = demo_cache.cache_root(args) / "models" / f"{args.preset}-seed0"
    if (d / "config.json").is_file() and demo_cache.is_complete(d):
        console.print(f"[dim]model: {d} (cached)[/dim]")
        return d
    demo_cache.build(d, lambda tmp: [sys.executable, "-m", "model_server", "synth", str(tmp), "--preset",
                                     args.preset, "--seed", "0", "--quiet"],
                     f"synthesizing the {args.preset} model (offline, random weights) ...",
                     "model synthesis", console)
    console.print(f"[dim]model: {d} (synthesized)[/dim]")
    return d


def kill_leftover_backend(port: int) -> None:
    """Safety net: a model server still listening on our backend port after the proxy exited
    (the proxy normally stops it). Identified by its command line; killed by pid."""
    proc_dir = Path("/proc")
    if not proc_dir.is_dir():
        return
    needle = f"--port {port}"
    for p in proc_dir.iterdir():
        if not p.name.isdigit():
            continue
        try:
            cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "model_server" in cmd and needle in cmd:
            with contextlib.suppress(OSError):
                os.kill(int(p.name), signal.SIGKILL)


def stop(proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


