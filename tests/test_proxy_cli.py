"""``edge-proxy serve`` as users run it: help, config validation, a real subprocess with an access log."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from tests.net_support import free_port
from tests.test_proxy_faults import UpstreamProcess

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "edge_proxy"]


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=60, cwd=ROOT, env=env)


def test_help_documents_flags():
    r = run_cli("serve", "--help")
    assert r.returncode == 0
    for flag in ("--backend", "--port", "--metrics-port", "--config", "--backend-kind", "--check-config",
                 "--upstream-timeout", "--max-body-bytes", "--access-log", "--set"):
        assert flag in r.stdout
    assert run_cli("--help").returncode == 0


def test_check_config_valid_and_invalid(tmp_path):
    cfg = tmp_path / "proxy.yaml"
    cfg.write_text("proxy:\n  backend_url: http://10.0.0.5:8000\n  upstream_timeout_seconds: 12\n")
    r = run_cli("serve", "--config", str(cfg), "--port", "9100", "--check-config")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["proxy"]["backend_url"] == "http://10.0.0.5:8000"
    assert out["proxy"]["upstream_timeout_seconds"] == 12.0 and out["proxy"]["port"] == 9100
    for bad in (["--backend", "not-a-url"], ["--port", "abc"], ["--set", "proxy.nope=1"],
                ["--config", str(tmp_path / "missing.yaml")], ["--backend-kind", "grpc"]):
        r = run_cli("serve", *bad, "--check-config")
        assert r.returncode == 2, bad
        assert "Traceback" not in r.stderr and r.stderr.strip(), bad
        assert len(r.stderr.strip().splitlines()) <= 3, r.stderr   # argparse: usage + one line
    cfg.write_text("proxy:\n  bogus_key: 1\n")
    r = run_cli("serve", "--config", str(cfg), "--check-config")
    assert r.returncode == 2 and "bogus_key" in r.stderr


def test_broken_yaml_is_one_line_wherever_it_comes_from(tmp_path):
    """A config file that is not YAML, and a mapping setting given as broken YAML on the command line or in the
    environment (which raised a traceback before): one line, exit 2, with the position."""
    cfg = tmp_path / "broken.yaml"
    cfg.write_text("proxy: [unclosed\n")
    env = {"PATH": "/usr/bin:/bin", "EDGE_PROXY_ECONOMICS_SCORES": "{a: [1"}
    for args, env_, where in ((["--config", str(cfg)], None, "line 2, column 1"),
                              (["--set", "economics.scores={a: [1"], None, "line 1, column 7"),
                              ([], env, "line 1, column 7")):
        r = run_cli("serve", *args, "--check-config", env=env_)
        err = r.stderr.strip()
        assert r.returncode == 2, err
        assert len(err.splitlines()) == 1 and "Traceback" not in err, err
        assert "not valid YAML" in err and where in err, err


def test_serve_subprocess_access_log_and_metrics(tmp_path):
    up = UpstreamProcess()
    port, mport = free_port(), free_port()
    log = tmp_path / "access.jsonl"
    proc = None
    try:
        import asyncio
        asyncio.run(up.wait_ready())
        proc = subprocess.Popen([*CLI, "serve", "--backend", up.url, "--port", str(port),
                                 "--metrics-port", str(mport), "--access-log", str(log)],
                                cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).read()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.1)
        body = json.dumps({"model": "fake-model", "prompt": "secret prompt words", "max_tokens": 3}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=body,
                                     headers={"Content-Type": "application/json"})
        out = json.loads(urllib.request.urlopen(req, timeout=10).read())
        assert out["usage"]["completion_tokens"] == 3
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=5).read().decode()
        assert "edge_proxy_requests_total" in metrics
        deadline = time.monotonic() + 10
        while not log.exists() or not log.read_text().strip():
            assert time.monotonic() < deadline
            time.sleep(0.05)
        line = json.loads(log.read_text().strip().splitlines()[-1])
        assert line["route"] == "/v1/completions" and line["output_tokens"] == 3 and line["input_tokens"] == 3
        assert line["outcome"] == "ok" and line["status"] == 200
        assert "secret" not in log.read_text()          # no prompt text unless --log-content
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        up.kill()


def test_unusable_paths_and_ports_are_one_line(tmp_path):
    """An access log in a directory that does not exist (a traceback before), and a metrics port already taken (the
    message named the client port): one line, exit 2, naming what cannot be used."""
    r = run_cli("serve", "--access-log", str(tmp_path / "no" / "such" / "dir" / "log.jsonl"), "--port", "0",
                "--metrics-port", "none", "--energy-source", "none", "--backend", "http://127.0.0.1:9")
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert err[-1].startswith("edge-proxy serve: error: cannot use ") and "log.jsonl" in err[-1], r.stderr
    import socket
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = run_cli("serve", "--port", "0", "--metrics-port", str(port), "--energy-source", "none",
                    "--backend", "http://127.0.0.1:9")
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert f"metrics port {port}" in r.stderr.strip().splitlines()[-1], r.stderr
