"""The three command lines take long options only as spelled out: a prefix of one is an unknown option, said in one
line with exit status 2, never another option's value (``edge-proxy serve --upstream URL`` used to be read as
``--upstream-timeout URL`` and fail on "expected float")."""
from __future__ import annotations

import subprocess
import sys

import pytest

CASES = [
    # (module, argv, the prefix that must be refused, the option it used to stand for)
    ("edge_proxy", ["serve", "--upstream", "http://127.0.0.1:9"], "--upstream", "--upstream-timeout"),
    ("model_server", ["serve", "/nonexistent-model-dir", "--quant", "int4"], "--quant", "--quantization"),
    ("edge_eval", ["metrics", "m.csv", "--gpu-usd", "2.5"], "--gpu-usd", "--gpu-usd-per-hour"),
]


@pytest.mark.parametrize("module,argv,prefix,full", CASES, ids=[c[0] for c in CASES])
def test_a_prefix_of_a_long_option_is_refused_in_one_line(module, argv, prefix, full, tmp_path) -> None:
    run = subprocess.run([sys.executable, "-m", module, *argv], cwd=tmp_path, capture_output=True, text=True,
                         timeout=60)
    err = run.stderr.strip()
    assert run.returncode == 2, err
    assert len(err.splitlines()) == 1, err                       # one line: no usage block, no traceback
    assert f"unrecognized arguments: {prefix}" in err
    assert "Traceback" not in err and full not in err


def test_the_full_spelling_still_parses(tmp_path) -> None:
    """The same option spelled out reaches the command (here: edge-eval metrics reading a file that is not there)."""
    run = subprocess.run([sys.executable, "-m", "edge_eval", "metrics", "m.csv", "--gpu-usd-per-hour", "2.5"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "m.csv: cannot read" in run.stderr and "unrecognized" not in run.stderr
