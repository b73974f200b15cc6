"""The compile cache shipped in the image (issue 17, cold start): ``model-server compile-cache fill`` fills a folder
by serving once, and a start with ``MODEL_SERVER_COMPILE_CACHE_SEED`` copies it into its empty cache and compiles
nothing. The end-to-end test runs the real server on CPU with the fused ops compiled (``MODEL_SERVER_FAST_FUSE=1``;
inductor's C++ backend), the unit tests :func:`model_server.compile_cache.seed` on generated files."""
from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from model_server import compile_cache
from model_server.compile_cache import MANIFEST, cache_files, seed, write_manifest


def _fake_cache(root: Path, n: int = 3) -> list[Path]:
    """Files shaped like a cache (hash folders, a Triton folder, a lock folder), generated."""
    files = [Path(f"a{i}") / f"c{i}.py" for i in range(n)] + [Path("triton") / "XYZ" / "k.cubin",
                                                              Path("bytecode") / "opt" / "m.cpython-311.pyc"]
    for rel in files:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(f"content of {rel}".encode())
    (root / "locks").mkdir(parents=True, exist_ok=True)
    (root / "locks" / "x.lock").write_text("")
    return files


def test_serve_keeps_inductors_and_tritons_caches_in_one_folder(monkeypatch, tmp_path):
    import os

    for var in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):     # set then deleted: undo restores either way
        monkeypatch.setenv(var, "x")
        monkeypatch.delenv(var)
    monkeypatch.setenv("MODEL_SERVER_COMPILE_CACHE", str(tmp_path / "cc"))
    assert compile_cache.configure() == tmp_path / "cc"
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "cc")
    assert os.environ["TRITON_CACHE_DIR"] == str(tmp_path / "cc" / "triton")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "mine"))          # an explicit one wins
    compile_cache.configure()
    assert os.environ["TRITON_CACHE_DIR"] == str(tmp_path / "mine")


def test_seed_copies_what_is_missing_and_never_overwrites(tmp_path, monkeypatch):
    src, dst = tmp_path / "seed", tmp_path / "cache"
    files = _fake_cache(src)
    manifest = write_manifest(src, {"device": "card X"})
    assert manifest["files"] == len(files) and manifest["torch"] == compile_cache.versions()["torch"]
    assert manifest["bytecode_files"] == 1                                  # torch's bytecode counted apart
    (dst / files[0]).parent.mkdir(parents=True)
    (dst / files[0]).write_text("the cache's own")
    res = seed(dst, src)
    assert (res.copied_files, res.present_files, res.skipped, res.seed_device) == (len(files) - 1, 1, None, "card X")
    assert (dst / files[0]).read_text() == "the cache's own"
    assert all((dst / f).read_bytes() == (src / f).read_bytes() for f in files[1:])
    assert not (dst / "locks").exists() and not (dst / MANIFEST).exists()
    # the marker: a second start with the same seed does not walk it again
    monkeypatch.setattr(compile_cache, "cache_files", lambda root: pytest.fail("walked the seed again"))
    again = seed(dst, src)
    assert again.copied_files == 0 and again.skipped is None


def test_seed_puts_tritons_files_where_triton_looks(tmp_path, monkeypatch):
    """An explicit TRITON_CACHE_DIR outside the inductor folder gets the seed's Triton files; the inductor
    folder gets the rest and no triton/ copy."""
    src, cache, triton = tmp_path / "seed", tmp_path / "cache", tmp_path / "elsewhere" / "triton-cache"
    files = _fake_cache(src)
    write_manifest(src, {"device": "card X"})
    monkeypatch.setenv("MODEL_SERVER_COMPILE_CACHE_SEED", str(src))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(cache))
    monkeypatch.setenv("TRITON_CACHE_DIR", str(triton))
    res = compile_cache.seed_from_environment()
    assert res.skipped is None and res.copied_files == len(files)
    assert (triton / "XYZ" / "k.cubin").read_bytes() == (src / "triton" / "XYZ" / "k.cubin").read_bytes()
    assert not (cache / "triton").exists()
    assert all((cache / f).is_file() for f in files if f.parts[0] != "triton")


@pytest.mark.parametrize("change", ["torch", "triton"])
def test_a_seed_from_other_versions_is_not_copied(tmp_path, change):
    src, dst = tmp_path / "seed", tmp_path / "cache"
    _fake_cache(src)
    write_manifest(src, {})
    data = json.loads((src / MANIFEST).read_text())
    data[change] = "0.0.1-other"
    (src / MANIFEST).write_text(json.dumps(data))
    res = seed(dst, src)
    assert res.copied_files == 0 and change in res.skipped and "0.0.1-other" in res.skipped
    assert cache_files(dst) == []


def test_unusable_seeds_are_skipped_with_one_line(tmp_path):
    src = tmp_path / "seed"
    _fake_cache(src)
    res = seed(tmp_path / "cache", src)                                    # never filled: no manifest
    assert res.copied_files == 0 and MANIFEST in res.skipped
    (src / MANIFEST).write_text("{not json")
    res = seed(tmp_path / "cache", src)
    assert res.copied_files == 0 and "not a compile cache manifest" in res.skipped and "\n" not in res.skipped
    write_manifest(src, {})
    (tmp_path / "a-file").write_text("")
    res = seed(tmp_path / "a-file" / "cache", src)                         # the cache cannot be made: no raise
    assert res.copied_files == 0 and "stopped" in res.skipped and "\n" not in res.skipped
    assert seed(tmp_path / "cache", None).skipped is None                  # no seed configured: nothing to do


def _run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "model_server", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_cli_errors_are_one_line(tmp_path):
    r = _run_cli("compile-cache", "show", str(tmp_path))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and MANIFEST in r.stderr
    r = _run_cli("compile-cache", "fill", str(tmp_path / "no-model"), "--out", str(tmp_path / "out"), "--device", "cpu")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "error:" in r.stderr.splitlines()[-1]
    (tmp_path / "file").write_text("")
    r = _run_cli("compile-cache", "fill", str(tmp_path), "--out", str(tmp_path / "file" / "out"), "--quiet")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "cannot write" in r.stderr
    r = _run_cli("compile-cache", "fill", "--help")
    assert r.returncode == 0 and "--out" in r.stdout
    r = _run_cli("compile-cache")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "fill or show" in r.stderr
    r = _run_cli("compile-cache", "fill", str(tmp_path), "--out", str(tmp_path / "o"), "--timeout", "-1")
    assert r.returncode == 2 and "expected a positive number" in r.stderr and "Traceback" not in r.stderr


def test_the_fuse_switch_is_checked(tiny_model_dir, monkeypatch):
    """MODEL_SERVER_FAST_FUSE=1 compiles the fused ops on CPU (what the end-to-end test below relies on); a bad
    value is a one-line error from serve."""
    from model_server.switches import flag as switch

    monkeypatch.setenv("MODEL_SERVER_FAST_FUSE", "yes")
    with pytest.raises(ValueError, match="MODEL_SERVER_FAST_FUSE must be 0 or 1"):
        switch("MODEL_SERVER_FAST_FUSE")
    from model_server.loading import load_model
    from model_server.server import SwitchError, create_engine

    with pytest.raises(SwitchError, match="MODEL_SERVER_FAST_FUSE"):    # never a reason for auto's fallback
        create_engine("fast", load_model(tiny_model_dir, "cpu", "none", True), 2, 64)
    r = subprocess.run([sys.executable, "-m", "model_server", "serve", tiny_model_dir, "--device", "cpu",
                        "--engine", "fast", "--port", "0"], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "MODEL_SERVER_FAST_FUSE must be 0 or 1" in r.stderr.splitlines()[-1]
    assert "Traceback" not in r.stderr


def _info(url: str) -> dict:
    with urllib.request.urlopen(url + "/info", timeout=10) as r:
        return json.load(r)


def test_a_filled_seed_makes_a_fresh_start_compile_nothing(tiny_model_dir, tmp_path, monkeypatch):
    """Fill on CPU with the fused ops compiled, then start on an empty cache with the seed: every file of the
    seed arrives, the start reaches its fused path and writes no new compile artifact (every compile hit)."""
    from tests.conftest import start_model_server

    for var in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "MODEL_SERVER_COMPILE_CACHE_SEED"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MODEL_SERVER_FAST_FUSE", "1")
    out = tmp_path / "seed"
    r = subprocess.run([sys.executable, "-m", "model_server", "compile-cache", "fill", tiny_model_dir, "--out",
                        str(out), "--device", "cpu", "--engine", "fast", "--max-batch", "4"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "requests at batch 4 of 4" in r.stderr and "stopping the server" in r.stderr      # progress lines
    manifest = json.loads((out / MANIFEST).read_text())
    seeded = set(cache_files(out))
    assert manifest["files"] == len(seeded) > 10 and manifest["engine"] == "fast"
    assert manifest["serve_args"][:2] == ["--quantization", "none"]
    assert any(p.parts[0] == "fxgraph" for p in seeded)                    # inductor's graphs, not only code

    cache = tmp_path / "fresh-cache"
    monkeypatch.setenv("MODEL_SERVER_COMPILE_CACHE", str(cache))
    monkeypatch.setenv("MODEL_SERVER_COMPILE_CACHE_SEED", str(out))
    with start_model_server(tiny_model_dir, "--engine", "fast", "--max-batch", "4") as srv:
        info = _info(srv.url)
        assert info["compile_cache"]["copied_files"] == len(seeded) and info["compile_cache"]["skipped"] is None
        deadline = time.monotonic() + 300
        while not _info(srv.url)["engine_warm"]:
            assert time.monotonic() < deadline, srv.log()[-2000:]
            time.sleep(0.5)
        assert "fused ops on" in srv.log()
        st = _info(srv.url)["startup"]             # no request came: the compile began hold_s after ready
        assert st["ready"] < st["fused_compile_start"] < st["fused_ready"]
    assert set(cache_files(cache)) == seeded, sorted(map(str, set(cache_files(cache)) - seeded))[:5]
