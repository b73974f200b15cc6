"""Where a cold start's ``import torch`` goes on this host: fresh interpreters, with and without bytecode caches.

A spawned model server spends most of its cold start importing torch (4-5 s on the H100 host in
docs/benchmarks.md against ~1.3 s on a 2-core CPU VM). This benchmark times, in fresh interpreters, ``import torch``
as the host has it (``default``), with a bytecode cache of its own (``PYTHONPYCACHEPREFIX``, filled by a first
run: what an image can ship when site-packages lacks or cannot write ``__pycache__``), and ``import torch`` plus
the CUDA driver's init (``torch_cuda``), each minus a bare interpreter's start; and it records the facts that
decide the gap (the torch tree's ``.py`` vs cached ``.pyc`` counts, whether it is writable, the bytecode flags)
and the largest self times of ``-X importtime``. Writes ``import_torch.json`` and ``import_torch.md``.

    python benchmarks/import_torch.py --reps 5 --out out/imports
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

CASES = {
    "bare": "pass",
    "default": "import torch",
    "torch_cuda": "import torch; torch.cuda.init() if torch.cuda.is_available() else None",
}


def _run(code: str, env: dict[str, str], args: tuple[str, ...] = ()) -> tuple[float, str]:
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, *args, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    seconds = time.monotonic() - t0
    if done.returncode != 0:
        raise SystemExit(f"import_torch: `{code}` failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}")
    return seconds, done.stderr


def tree_facts() -> dict[str, Any]:
    """The torch package's location, its ``.py`` files and how many have a cached ``.pyc`` for this Python."""
    import importlib.util

    spec = importlib.util.find_spec("torch")
    if spec is None or spec.origin is None:
        raise SystemExit("import_torch: torch is not installed")
    root = Path(spec.origin).parent
    tag = sys.implementation.cache_tag
    py = cached = 0
    for path in root.rglob("*.py"):
        py += 1
        cached += (path.parent / "__pycache__" / f"{path.stem}.{tag}.pyc").exists()
    return {"python": sys.version.split()[0], "torch_dir": str(root), "py_files": py, "pyc_cached": cached,
            "torch_dir_writable": os.access(root, os.W_OK), "dont_write_bytecode": sys.flags.dont_write_bytecode,
            "env": {k: os.environ[k] for k in ("PYTHONDONTWRITEBYTECODE", "PYTHONPYCACHEPREFIX") if k in os.environ},
            "cpus": os.cpu_count()}


def top_self(stderr: str, n: int = 15) -> list[tuple[str, float]]:
    """The ``n`` largest self times (s) in ``-X importtime`` output."""
    rows = []
    for line in stderr.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        parts = line[len("import time:"):].split("|")
        if len(parts) == 3 and parts[0].strip().lstrip("-").isdigit():
            rows.append((parts[2].strip(), int(parts[0]) / 1e6))
    return sorted(rows, key=lambda r: -r[1])[:n]


def measure(reps: int, prefix_dir: str) -> dict[str, Any]:
    base = {k: v for k, v in os.environ.items() if k != "PYTHONPYCACHEPREFIX"}
    prefixed = {k: v for k, v in base.items() if k != "PYTHONDONTWRITEBYTECODE"}   # the fill must write
    prefixed["PYTHONPYCACHEPREFIX"] = prefix_dir
    out: dict[str, Any] = {}
    fill, _ = _run(CASES["default"], prefixed)       # writes the prefix cache (timed: a start without any cache)
    out["prefix_fill_s"] = round(fill, 3)
    for name, env in (("bare", base), ("default", base), ("torch_cuda", base), ("prefix", prefixed)):
        code = CASES["default" if name == "prefix" else name]
        times = []
        for i in range(reps):
            seconds, _ = _run(code, env)
            times.append(round(seconds, 3))
            print(f"  {name} rep {i + 1}: {seconds:.3f} s", flush=True)
        out[name] = times
    _, stderr = _run(CASES["default"], base, ("-X", "importtime"))
    out["top_self_s"] = top_self(stderr)
    return out


def report(facts: dict[str, Any], res: dict[str, Any], card: str, commit: str) -> str:
    bare = statistics.median(res["bare"])
    lines = [f"# import torch on {card} ({time.strftime('%Y-%m-%d')}, commit {commit})", "",
             f"Python {facts['python']}, {facts['cpus']} CPUs; torch at `{facts['torch_dir']}`: {facts['py_files']} .py files, "
             f"{facts['pyc_cached']} with a cached .pyc; writable: {facts['torch_dir_writable']}; "
             f"dont_write_bytecode: {facts['dont_write_bytecode']}; env: {facts['env'] or 'none'}", "",
             "| case | median s (minus a bare interpreter) | reps (s, wall) |", "|---|---|---|"]
    for name in ("default", "torch_cuda", "prefix"):
        lines.append(f"| {name} | {statistics.median(res[name]) - bare:.3f} | {', '.join(map(str, res[name]))} |")
    lines += ["", f"bare interpreter median {bare:.3f} s; a first start with an empty PYTHONPYCACHEPREFIX (compiles "
              f"and writes every module): {res['prefix_fill_s']:.3f} s", "", "largest self times under -X importtime (s): "
              + ", ".join(f"{m} {s:.3f}" for m, s in res["top_self_s"]), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5, help="fresh interpreters per case (default 5)")
    ap.add_argument("--out", default="out/imports", help="folder for import_torch.json/.md (default out/imports)")
    ap.add_argument("--commit", default=os.environ.get("EDGE_EVAL_COMMIT", "unknown"), help="the commit measured")
    args = ap.parse_args(argv)
    if args.reps < 1:
        ap.error("--reps must be at least 1")
    facts = tree_facts()
    with tempfile.TemporaryDirectory(prefix="pycache_") as prefix_dir:
        res = measure(args.reps, prefix_dir)
    card = "CPU"
    try:
        card = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=30).stdout.strip().splitlines()[0] or card
    except (OSError, IndexError, subprocess.SubprocessError):
        pass
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "import_torch.json").write_text(json.dumps({"card": card, "commit": args.commit, "facts": facts, **res},
                                                      indent=1))
    md = report(facts, res, card, args.commit)
    (out / "import_torch.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
