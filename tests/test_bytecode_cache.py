"""model_server.bytecode_cache: a package installed without bytecode is compiled once, then read from the cache.

Real interpreters on a package generated here (no .pyc beside it, PYTHONDONTWRITEBYTECODE=1 as in our image),
and a real ``serve`` whose /info says where torch's bytecode came from."""
from __future__ import annotations

import compileall
import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

from model_server.bytecode_cache import BytecodeCache, configure, has_own_bytecode

PROBE = """
import json, sys
from pathlib import Path
from model_server.bytecode_cache import configure
choice = configure(Path(sys.argv[1]), package="genpkg")
import genpkg
print(json.dumps({"choice": choice.as_dict(), "cached": genpkg.__cached__, "sub": genpkg.sub.VALUE,
                  "prefix": sys.pycache_prefix}))
"""


def _package(root: Path) -> Path:
    pkg = root / "genpkg"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("from . import sub\n")
    (pkg / "sub.py").write_text("VALUE = sum(i * i for i in range(10))\n")
    return pkg


def _probe(site: Path, cache: Path, mode: str | None) -> dict:
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "PYTHONPATH": os.pathsep.join([str(site), os.getcwd()])}
    env.pop("PYTHONPYCACHEPREFIX", None)
    env.pop("MODEL_SERVER_BYTECODE_CACHE", None)
    if mode is not None:
        env["MODEL_SERVER_BYTECODE_CACHE"] = mode
    r = subprocess.run([sys.executable, "-c", PROBE, str(cache)], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout)


def _pycs(folder: Path) -> set[str]:
    return {p.name for p in folder.rglob("*.pyc")}


def test_a_package_without_bytecode_is_compiled_once_into_the_cache_then_read(tmp_path):
    site, cache = tmp_path / "site", tmp_path / "cache"
    pkg = _package(site)
    first = _probe(site, cache, None)
    assert first["choice"]["mode"] == "cache" and first["sub"] == 285
    assert first["choice"]["dir"] == str((cache / "bytecode").resolve()) == first["prefix"]
    tag = sys.implementation.cache_tag
    assert _pycs(cache / "bytecode") == {f"__init__.{tag}.pyc", f"sub.{tag}.pyc"}
    assert Path(first["cached"]).is_relative_to(cache / "bytecode")
    assert not (pkg / "__pycache__").exists()                 # the installed tree is never written
    written = {p: p.stat().st_mtime_ns for p in (cache / "bytecode").rglob("*.pyc")}
    second = _probe(site, cache, None)
    assert second["choice"]["mode"] == "cache" and second["sub"] == 285
    assert {p: p.stat().st_mtime_ns for p in (cache / "bytecode").rglob("*.pyc")} == written     # read, not rewritten


def test_a_package_with_its_own_bytecode_is_left_alone_unless_asked(tmp_path):
    site, cache = tmp_path / "site", tmp_path / "cache"
    pkg = _package(site)
    assert compileall.compile_dir(str(pkg), quiet=1)
    res = _probe(site, cache, "auto")
    assert res["choice"]["mode"] == "installed" and res["prefix"] is None and not cache.exists()
    assert Path(res["cached"]).parent == pkg / "__pycache__"
    forced = _probe(site, cache, "1")                        # 1: always, beside the compile cache
    assert forced["choice"]["mode"] == "cache" and _pycs(cache / "bytecode")
    elsewhere = tmp_path / "elsewhere"
    there = _probe(site, cache, str(elsewhere))             # a folder: always, there
    assert there["choice"]["dir"] == str(elsewhere.resolve()) and _pycs(elsewhere)
    off = _probe(site, tmp_path / "unused", "0")
    assert off["choice"] == {"mode": "off", "dir": None, "reason": "MODEL_SERVER_BYTECODE_CACHE=0"}
    assert off["prefix"] is None and not (tmp_path / "unused").exists()


def test_auto_leaves_an_operators_own_pycache_prefix_alone(tmp_path):
    site, cache, theirs = tmp_path / "site", tmp_path / "cache", tmp_path / "theirs"
    _package(site)
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "PYTHONPYCACHEPREFIX": str(theirs),
           "PYTHONPATH": os.pathsep.join([str(site), os.getcwd()])}
    env.pop("MODEL_SERVER_BYTECODE_CACHE", None)
    r = subprocess.run([sys.executable, "-c", PROBE, str(cache)], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout)
    assert res["choice"] == {"mode": "off", "dir": str(theirs),
                             "reason": "a pycache prefix is already set for this interpreter"}
    assert res["prefix"] == str(theirs) and not cache.exists()


def test_an_unusable_folder_or_a_missing_package_is_one_reason_never_an_error(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    before = sys.pycache_prefix
    res = configure(tmp_path, env={"MODEL_SERVER_BYTECODE_CACHE": str(blocker / "sub")})
    assert res.mode == "off" and "not used" in res.reason and "\n" not in res.reason
    assert sys.pycache_prefix == before
    assert configure(tmp_path, package="no_such_pkg_here", env={}) == BytecodeCache(
        "off", None, "no_such_pkg_here is not installed")
    assert has_own_bytecode("no_such_pkg_here") is None
    assert has_own_bytecode("json") in (True, False)       # a stdlib package: found without importing anything


def test_serve_reports_where_torchs_bytecode_came_from(tiny_model_dir, tmp_path, monkeypatch):
    """``MODEL_SERVER_BYTECODE_CACHE=1``: the server's own imports after listening (torch among them) are compiled
    into the compile cache's bytecode folder, and /info says so."""
    from tests.conftest import start_model_server

    monkeypatch.setenv("MODEL_SERVER_COMPILE_CACHE", str(tmp_path / "cc"))
    monkeypatch.setenv("MODEL_SERVER_BYTECODE_CACHE", "1")
    for var in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "MODEL_SERVER_COMPILE_CACHE_SEED"):
        monkeypatch.delenv(var, raising=False)
    with start_model_server(tiny_model_dir, "--engine", "transformers") as srv:
        with urllib.request.urlopen(srv.url + "/info", timeout=10) as r:
            info = json.load(r)
    folder = tmp_path / "cc" / "bytecode"
    assert info["bytecode_cache"] == {"mode": "cache", "dir": str(folder.resolve()),
                                      "reason": "MODEL_SERVER_BYTECODE_CACHE=1"}
    import torch

    torch_init = Path(torch.__file__)
    mirrored = folder.joinpath(*torch_init.parent.parts[1:])     # the prefix mirrors the source's own folder
    assert (mirrored / f"__init__.{sys.implementation.cache_tag}.pyc").exists(), sorted(_pycs(folder))[:5]
