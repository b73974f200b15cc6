"""model_server.weights_prefetch: the checkpoint read into the page cache on a thread while serve imports torch."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pytest

from model_server import weights_prefetch as wp
from model_server.switches import SwitchValueError


def _checkpoint(folder: Path, sizes: tuple[int, ...]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, size in enumerate(sizes):
        p = folder / f"model-{i + 1:05d}-of-{len(sizes):05d}.safetensors"
        p.write_bytes(os.urandom(size))
        paths.append(p)
    (folder / "config.json").write_text("{}")          # not a weights file: never read
    return paths


def test_every_byte_of_every_shard_is_read_once_then_on_done(tmp_path, monkeypatch):
    monkeypatch.delenv(wp.SWITCH, raising=False)
    monkeypatch.setattr(wp, "CHUNK_BYTES", 4096)           # several chunks per file, a partial last one
    paths = _checkpoint(tmp_path / "m", (3 * 4096 + 17, 1, 5000))
    seen: list[wp.Prefetch] = []
    job = wp.start(str(tmp_path / "m"), on_done=seen.append, available=1 << 40)
    assert job.wait(30)
    assert job.files == paths and job.skipped is None and job.error is None
    assert job.read_bytes == job.total_bytes == sum(p.stat().st_size for p in paths)
    assert job.seconds is not None and seen == [job]
    assert job.as_dict() == {"files": 3, "total_bytes": job.total_bytes, "read_bytes": job.total_bytes,
                             "seconds": job.seconds, "skipped": None, "error": None}


def test_what_it_skips_and_why(tmp_path, monkeypatch):
    _checkpoint(tmp_path / "m", (10_000,))
    monkeypatch.setenv(wp.SWITCH, "0")
    off = wp.start(str(tmp_path / "m"), available=1 << 40)
    assert off.skipped == f"{wp.SWITCH}=0" and off.wait(0) and off.read_bytes == 0
    monkeypatch.setenv(wp.SWITCH, "yes")
    with pytest.raises(SwitchValueError, match=wp.SWITCH):
        wp.start(str(tmp_path / "m"))
    monkeypatch.setenv(wp.SWITCH, "1")
    hub = wp.start("some-org/some-model")
    assert hub.skipped == "no local safetensors files" and hub.wait(0)
    big = wp.start(str(tmp_path / "m"), available=19_999)      # 10 kB > half of 19.999 kB
    assert big.skipped is not None and "> 50% of the" in big.skipped and big.read_bytes == 0
    fits = wp.start(str(tmp_path / "m"), available=20_000)
    assert fits.wait(30) and fits.read_bytes == 10_000


def test_a_file_gone_between_listing_and_sizing_is_a_reason(tmp_path, monkeypatch):
    monkeypatch.delenv(wp.SWITCH, raising=False)
    monkeypatch.setattr(wp, "checkpoint_files", lambda model_id: [tmp_path / "gone.safetensors"])
    job = wp.start(str(tmp_path))
    assert job.wait(0) and job.files == [] and job.read_bytes == 0
    assert job.skipped is not None and job.skipped.startswith("cannot list the weights: ")


def test_a_failed_read_is_recorded_never_raised(tmp_path):
    job = wp.Prefetch(files=[tmp_path / "gone.safetensors"], total_bytes=10)
    done = threading.Event()
    wp._read_all(job, [tmp_path / "gone.safetensors"], lambda _: done.set())
    assert done.is_set() and job.wait(0) and job.read_bytes == 0
    assert job.error is not None and "gone.safetensors" in job.error and "\n" not in job.error


def test_available_memory_comes_from_meminfo(tmp_path):
    info = tmp_path / "meminfo"
    info.write_text("MemTotal:       16000000 kB\nMemAvailable:    1234567 kB\n")
    assert wp.available_memory_bytes(info) == 1234567 * 1024
    info.write_text("MemTotal: 1 kB\n")
    assert wp.available_memory_bytes(info) is None
    assert wp.available_memory_bytes(tmp_path / "absent") is None


def _info(url: str) -> dict:
    with urllib.request.urlopen(url + "/info", timeout=10) as r:
        return json.load(r)


def test_serve_prefetches_the_checkpoint_and_says_so(tiny_model_dir, monkeypatch):
    from tests.conftest import start_model_server

    monkeypatch.delenv(wp.SWITCH, raising=False)
    size = sum(p.stat().st_size for p in Path(tiny_model_dir).glob("*.safetensors"))
    with start_model_server(tiny_model_dir, "--engine", "transformers") as srv:
        info = _info(srv.url)
    got = info["weights_prefetch"]
    assert got["total_bytes"] == got["read_bytes"] == size > 0 and got["error"] is None
    assert info["startup"]["listening"] <= info["startup"]["weights_prefetched"]
    monkeypatch.setenv(wp.SWITCH, "0")
    with start_model_server(tiny_model_dir, "--engine", "transformers") as srv:
        info = _info(srv.url)
    assert info["weights_prefetch"]["skipped"] == f"{wp.SWITCH}=0" and "weights_prefetched" not in info["startup"]


def test_serve_refuses_a_bad_switch_value_in_one_line(tiny_model_dir):
    env = {**os.environ, wp.SWITCH: "on"}
    r = subprocess.run([sys.executable, "-m", "model_server", "serve", tiny_model_dir, "--device", "cpu", "--port", "0"],
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == f"model-server serve: error: {wp.SWITCH} must be 0 or 1, got 'on'"
