"""``model-server synth`` (shapes of the public models, determinism, marker) and CLI errors."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(120)

# Parameter counts published for the public models (tied embeddings counted once).
PUBLIC_PARAMETERS = {"llama-3.2-1b": 1_235_814_400, "qwen2.5-0.5b": 494_032_768}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_tiny_is_deterministic_and_marked(tiny_model_dir, tmp_path):
    from model_server.synth import synthesize

    again = synthesize(tmp_path / "again", "tiny", seed=0, show_progress=False)
    first = Path(tiny_model_dir)           # built by the CLI in the fixture
    assert _sha(first / "model.safetensors") == _sha(again / "model.safetensors")
    assert _sha(first / "tokenizer.json") == _sha(again / "tokenizer.json")
    cfg = json.loads((first / "config.json").read_text())
    assert cfg["edge_eval_synthetic"] is True
    assert (first / "generation_config.json").is_file()

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(first)
    assert len(tok) <= cfg["vocab_size"]
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert "hi" in chat and chat != "hi"
    ids = tok("print('héllo wörld')")["input_ids"]
    assert tok.decode(ids) == "print('héllo wörld')"           # byte-level: lossless round trip


@pytest.mark.parametrize("preset", sorted(PUBLIC_PARAMETERS))
def test_big_preset_shapes_match_public_models(preset):
    import torch
    from transformers import AutoModelForCausalLM

    from model_server.synth import PRESETS, _config_for

    cfg = _config_for(PRESETS[preset], vocab_size=8192)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    assert sum(p.numel() for p in model.parameters()) == PUBLIC_PARAMETERS[preset]
    assert cfg.tie_word_embeddings is True


def test_cli_errors_are_one_line(tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "model_server", *args], capture_output=True, text=True,
                              timeout=60)

    r = run("serve", str(tmp_path / "missing"), "--port", "0")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and "not found" in r.stderr
    r = run("synth", str(tmp_path / "x"), "--preset", "gpt-9")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "invalid choice" in r.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    r = run("serve", str(empty), "--port", "0")
    assert r.returncode == 2 and "config.json" in r.stderr and "Traceback" not in r.stderr
    r = run("serve", "--help")
    assert r.returncode == 0 and "--quantization" in r.stdout


def test_gptq_without_gptqmodel_is_a_clear_error(tiny_model_dir, tmp_path):
    import importlib.util
    import shutil

    if importlib.util.find_spec("gptqmodel") is not None:
        pytest.skip("gptqmodel is installed here")
    ckpt = tmp_path / "gptq-like"
    shutil.copytree(tiny_model_dir, ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 32}
    (ckpt / "config.json").write_text(json.dumps(cfg))
    r = subprocess.run([sys.executable, "-m", "model_server", "serve", str(ckpt), "--port", "0",
                        "--device", "cpu", "--quantization", "gptq"], capture_output=True, text=True, timeout=90)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "gptqmodel" in errors[0] and "auto-gptq" in errors[0]


@pytest.mark.parametrize("value", ["abc", "0", "-1"])
def test_bad_switch_interval_is_a_one_line_error(tiny_model_dir, value):
    r = subprocess.run([sys.executable, "-m", "model_server", "serve", str(tiny_model_dir), "--port", "0"],
                       capture_output=True, text=True, timeout=60,
                       env={**os.environ, "MODEL_SERVER_SWITCH_INTERVAL_S": value})
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and "MODEL_SERVER_SWITCH_INTERVAL_S" in r.stderr
