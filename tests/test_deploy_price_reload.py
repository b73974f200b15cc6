"""Changing a price never costs a cold start (issue 20): a running ``edge-proxy serve --config``
picks up the economics section on SIGHUP and when the file changes (a ConfigMap volume update),
keeps serving, ignores what needs a restart, and keeps the old prices when the new file is bad."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml

from tests.net_support import free_port, wait_http_ok

EDGE_PROXY = shutil.which("edge-proxy", path=str(Path(sys.executable).parent)) or "edge-proxy"


def metric(mport: int, name: str, labels: str) -> float | None:
    with urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(f"{name}{{{labels}}} "):
                return float(line.rsplit(" ", 1)[1])
    return None


def wait_for(mport: int, name: str, labels: str, value: float, timeout: float) -> float | None:
    deadline = time.monotonic() + timeout
    got = None
    while time.monotonic() < deadline:
        got = metric(mport, name, labels)
        if got == value:
            return got
        time.sleep(0.2)
    return got


def write_config(path: Path, port: int, mport: int, per_kwh: float, **proxy: object) -> None:
    tmp = path.with_suffix(".new")       # replace the file as a ConfigMap update does (new inode)
    tmp.write_text(yaml.safe_dump({
        "proxy": {"backend_url": "http://127.0.0.1:9", "port": port, "metrics_port": mport, **proxy},
        "energy": {"source": "none"},
        "economics": {"usd_per_kwh": per_kwh, "api_usd_per_million_output_tokens": 0.6},
    }))
    os.replace(tmp, path)


def test_prices_reload_on_file_change_and_sighup_without_restart(tmp_path: Path) -> None:
    port, mport = free_port(), free_port()
    cfg = tmp_path / "edge-proxy.yaml"
    write_config(cfg, port, mport, 0.12)
    proc = subprocess.Popen([EDGE_PROXY, "serve", "--config", str(cfg), "--host", "127.0.0.1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    price = ("edge_proxy_price_usd", 'item="per_kwh"')
    try:
        wait_http_ok(f"http://127.0.0.1:{mport}/healthz", timeout=30, proc=proc)
        assert metric(mport, *price) == 0.12

        # The file changes (as the kubelet updates a ConfigMap volume): applied by the file watch.
        write_config(cfg, port, mport, 0.30)
        assert wait_for(mport, *price, 0.30, timeout=30) == 0.30

        # SIGHUP applies at once.
        write_config(cfg, port, mport, 0.50)
        proc.send_signal(signal.SIGHUP)
        assert wait_for(mport, *price, 0.50, timeout=30) == 0.50

        # A bad file: the running prices stay, the failure is counted.
        cfg.write_text("economics: [not, a, mapping\n")
        proc.send_signal(signal.SIGHUP)
        assert wait_for(mport, "edge_proxy_config_reloads_total", 'outcome="failed"', 1.0, timeout=30) == 1.0
        assert metric(mport, *price) == 0.50

        # A key that needs a restart is not applied (the process keeps its port); prices still are.
        write_config(cfg, port, mport, 0.70, upstream_timeout_seconds=5.0)
        proc.send_signal(signal.SIGHUP)
        assert wait_for(mport, *price, 0.70, timeout=30) == 0.70
        assert proc.poll() is None, "the proxy exited on a reload"
    finally:
        proc.terminate()
        try:
            _, err = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
    assert "needs a restart" in err and "proxy" in err
    assert "Traceback" not in err
