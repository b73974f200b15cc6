"""The direct load path (model_server.fast_load) builds the same model as from_pretrained, and falls back
to from_pretrained, with a log line, for anything it does not handle (CPU, the tiny preset)."""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch

from model_server import fast_load
from model_server.loading import load_model


def _load(monkeypatch, model_dir: str, quant: str, direct: bool):
    monkeypatch.setenv("MODEL_SERVER_DIRECT_LOAD", "1" if direct else "0")
    return load_model(model_dir, "cpu", quant)


def _tensors(model) -> dict[str, torch.Tensor]:
    return {**dict(model.named_parameters(remove_duplicate=False)), **dict(model.named_buffers(remove_duplicate=False))}


@pytest.mark.parametrize("quant", ["none", "bf16", "int4"])
def test_direct_path_builds_the_same_model(monkeypatch, tiny_model_dir, quant):
    ref = _load(monkeypatch, tiny_model_dir, quant, direct=False)
    got = _load(monkeypatch, tiny_model_dir, quant, direct=True)
    assert (ref.load_path, got.load_path) == ("from_pretrained", "direct")
    a, b = _tensors(ref.model), _tensors(got.model)
    assert a.keys() == b.keys()
    for k in a:      # parameters and buffers (rotary inv_freq; INT4 packed weights and scales)
        assert a[k].dtype == b[k].dtype and a[k].device == b[k].device, k
        assert torch.equal(a[k], b[k]), k
        assert a[k].requires_grad == b[k].requires_grad, k
    tied = [m.model.lm_head.weight is m.model.model.embed_tokens.weight for m in (ref, got)
            if hasattr(m.model.lm_head, "weight")]
    assert len(set(tied)) <= 1
    for field in ("dtype", "quantization", "architecture", "parameters", "weight_bytes", "context_length",
                  "eos_token_ids"):
        assert getattr(ref, field) == getattr(got, field), field
    assert ref.model.config._attn_implementation == got.model.config._attn_implementation
    assert ref.model.training is got.model.training is False
    ids = torch.tensor([[1, 7, 42, 99, 300]])
    with torch.inference_mode():
        want = ref.model.generate(ids, max_new_tokens=8, do_sample=False)
        have = got.model.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(want, have)
    assert set(got.load_marks) >= {"read_end", "build_end"} | ({"quantize_end"} if quant == "int4" else set())


def test_unsupported_reasons(tmp_path, tiny_model_dir, monkeypatch):
    cfg = json.loads((Path(tiny_model_dir) / "config.json").read_text())
    assert fast_load.unsupported_reason(tiny_model_dir, "bf16", cfg) is None
    assert "nf4" in fast_load.unsupported_reason(tiny_model_dir, "nf4", cfg)
    assert "int8" in fast_load.unsupported_reason(tiny_model_dir, "int8", cfg)
    assert "gptq" in fast_load.unsupported_reason(tiny_model_dir, "gptq", cfg)
    assert "pre-quantized" in fast_load.unsupported_reason(
        tiny_model_dir, "none", {**cfg, "quantization_config": {"quant_method": "gptq"}})
    assert "GPT2LMHeadModel" in fast_load.unsupported_reason(tiny_model_dir, "none",
                                                             {**cfg, "architectures": ["GPT2LMHeadModel"]})
    assert "local" in fast_load.unsupported_reason("org/model", "none", None)
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "model.safetensors.index.json").write_text("{}")
    assert "sharded" in fast_load.unsupported_reason(str(sharded), "none", cfg)
    monkeypatch.setenv("MODEL_SERVER_DIRECT_LOAD", "0")
    assert "MODEL_SERVER_DIRECT_LOAD=0" in fast_load.unsupported_reason(tiny_model_dir, "none", cfg)


def test_falls_back_when_loading_shows_a_mismatch(tmp_path, tiny_model_dir, monkeypatch, caplog):
    """A checkpoint with a key the model does not have: the direct path gives up after reading, and
    from_pretrained (which ignores unexpected keys) loads it; the log says which path and why."""
    from safetensors.torch import load_file, save_file

    d = tmp_path / "extra"
    shutil.copytree(tiny_model_dir, d)
    state = load_file(str(d / "model.safetensors"))
    state["model.extra_thing.weight"] = torch.zeros(4)
    save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
    monkeypatch.setenv("MODEL_SERVER_DIRECT_LOAD", "1")
    with caplog.at_level(logging.INFO, logger="model_server.loading"):
        loaded = load_model(str(d), "cpu", "none")
    assert loaded.load_path == "from_pretrained"
    assert any("load path: from_pretrained" in r.getMessage() and "unexpected" in r.getMessage()
               for r in caplog.records)


def test_direct_path_logs_itself(tiny_model_dir, monkeypatch, caplog):
    monkeypatch.setenv("MODEL_SERVER_DIRECT_LOAD", "1")
    with caplog.at_level(logging.INFO, logger="model_server.loading"):
        loaded = load_model(tiny_model_dir, "cpu", "none")
    assert loaded.load_path == "direct"
    assert any(r.getMessage().startswith("load path: direct") for r in caplog.records)
