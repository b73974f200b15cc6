"""The model volume's Job (k8s/components/synthetic-model) runs ``model-server synth``: re-running
it must not rewrite a complete model under a running server, a half-written model must never be
visible, and a directory holding something else must never be replaced (issue 20)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def synth(out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "model_server", "synth", str(out), "--preset", "tiny",
                           "--seed", "0", "--quiet"], capture_output=True, text=True, timeout=300)


def test_synth_is_atomic_and_idempotent(tmp_path: Path) -> None:
    models = tmp_path / "models"
    out = models / "tiny"
    # An interrupted earlier run: a synthetic model without its completion marker.
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps({"edge_eval_synthetic": True}))
    (out / "model.safetensors").write_bytes(b"truncated")
    r = synth(out)
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "edge_eval_synth.json").read_text())["preset"] == "tiny"
    weights = out / "model.safetensors"
    assert weights.stat().st_size > 1000
    assert sorted(p.name for p in models.iterdir()) == ["tiny"], "temporary directories left behind"

    # Run again (a re-applied Job): the complete model is left alone, byte for byte and inode.
    before = (weights.stat().st_ino, weights.stat().st_mtime_ns)
    r = synth(out)
    assert r.returncode == 0, r.stderr
    assert (weights.stat().st_ino, weights.stat().st_mtime_ns) == before, "a complete model was rewritten"


def test_synth_never_replaces_a_directory_that_is_not_a_synthetic_model(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (real / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    r = synth(real)
    assert r.returncode == 2 and "refusing" in r.stderr and "Traceback" not in r.stderr
    assert (real / "config.json").read_text().startswith('{"architectures"')
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    r = synth(other)
    assert r.returncode == 2 and "refusing" in r.stderr
    assert (other / "notes.txt").read_text() == "mine"
