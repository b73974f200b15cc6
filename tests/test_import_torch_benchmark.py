"""benchmarks/import_torch.py on this machine: fresh interpreters, the bytecode facts, the report."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


def test_import_torch_measures_each_case_and_reports_the_install(tmp_path, monkeypatch):
    import import_torch  # benchmarks/import_torch.py

    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")          # as the GPU host and our image run
    assert import_torch.main(["--reps", "1", "--commit", "test", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "import_torch.json").read_text())
    for case in ("bare", "default", "torch_cuda", "prefix"):
        assert len(data[case]) == 1 and data[case][0] > 0
    assert data["default"][0] > data["bare"][0]                 # importing torch costs more than no import
    facts = data["facts"]
    assert facts["py_files"] > 1000 and 0 <= facts["pyc_cached"] <= facts["py_files"]
    assert facts["env"] == {"PYTHONDONTWRITEBYTECODE": "1"} and data["commit"] == "test"
    assert data["prefix_fill_s"] > 0 and any(name.startswith("torch") for name, _ in data["top_self_s"])
    md = (tmp_path / "import_torch.md").read_text()
    assert "| default |" in md and "| prefix |" in md and "largest self times" in md


def test_top_self_reads_importtime_lines():
    import import_torch

    log = "\n".join(["import time: self [us] | cumulative | imported package",
                     "import time:       120 |        120 |   a.b",
                     "import time:      3000 |       5000 | torch._C",
                     "import time:  -5667000 |      70111 | negative.thread.artifact",
                     "something else", "import time:        40 |         40 | c"])
    assert import_torch.top_self(log, 2) == [("torch._C", 0.003), ("a.b", 0.00012)]


def test_bad_arguments_are_one_line_errors(tmp_path, capsys):
    import import_torch

    with pytest.raises(SystemExit) as exc:
        import_torch.main(["--reps", "0", "--out", str(tmp_path)])
    assert exc.value.code == 2 and "--reps must be at least 1" in capsys.readouterr().err
