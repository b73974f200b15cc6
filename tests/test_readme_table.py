"""The README's "Measured" table is what scripts/readme_table.py generates from benchmarks/results/."""
from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "readme_table.py"


def _module():
    spec = importlib.util.spec_from_file_location("readme_table", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    sys.modules["readme_table"] = mod          # (dataclasses look their module up)
    spec.loader.exec_module(mod)
    return mod


def test_readme_matches_the_results_files():
    out = subprocess.run([sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    mod = _module()
    readme = (ROOT / "README.md").read_text()
    assert mod.table() in readme
    for row in mod.ROWS:                       # every row names files that exist
        assert all((ROOT / "benchmarks" / "results" / f).is_file() for f in row.files), row.files


def test_table_follows_the_files(tmp_path: Path):
    """Change a stored result: the table changes, and the README no longer matches it."""
    mod = _module()
    results = tmp_path / "results"
    shutil.copytree(ROOT / "benchmarks" / "results", results)
    f = results / "2026-11-26-h200" / "energy_validation.json"
    data = json.loads(f.read_text())
    data["checks"]["1_mixed_load_conservation"]["relative_error"] = 0.0123
    f.write_text(json.dumps(data))
    changed = mod.table(results)
    assert "| 1.230 % |" in changed and changed != mod.table()
    assert changed not in (ROOT / "README.md").read_text()


def test_markers_missing_is_one_line_error(tmp_path: Path):
    mod = _module()
    try:
        mod.splice("# no markers\n", "| x |\n")
    except ValueError as exc:
        assert "markers" in str(exc)
    else:
        raise AssertionError("splice accepted a README without markers")
