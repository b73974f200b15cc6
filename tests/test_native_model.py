"""The native model build (model_server.native) against transformers' build, issue 17 (cold start).

On the synthetic tiny presets (Llama ``tiny``; ``tiny-qwen2`` with random q/k/v biases; ``tiny`` with llama3
RoPE scaling; ``tiny`` with an older config's ``rope_scaling`` linear + top-level ``rope_theta``), for
``--quantization none|bf16|int4``: every parameter and buffer equal to the direct path's (transformers' model),
the fast engine's prefill logits bit for bit equal and its greedy tokens identical; RoPE tables, RMSNorm and the
MLP equal to transformers' modules; what falls back and why; a load on the native path imports neither
transformers nor torch._dynamo (CPU)."""
from __future__ import annotations

import asyncio
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

from model_server.engines.base import GenerationRequest, SamplingParams  # noqa: E402
from model_server.engines.fast import FastEngine  # noqa: E402
from model_server.engines.fast.runner import ModelRunner  # noqa: E402
from model_server.loading import load_model  # noqa: E402
from model_server.native import config as ncfg  # noqa: E402
from model_server.native import modeling, rope  # noqa: E402
from tests.conftest import synth_qwen2_with_biases  # noqa: E402

LLAMA3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 64}


def _variant(src: str, dst: Path, edit) -> str:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    edit(cfg)
    (dst / "config.json").write_text(json.dumps(cfg))
    return str(dst)


@pytest.fixture(scope="module")
def model_dirs(tiny_model_dir, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("native_models")
    q = Path(synth_qwen2_with_biases(root / "tiny-qwen2"))

    def llama3(c):
        c["rope_parameters"] = dict(LLAMA3)

    def legacy_linear(c):
        c.pop("rope_parameters")
        c["rope_scaling"] = {"type": "linear", "factor": 2.0}
        c["rope_theta"] = 20000

    return {"tiny": tiny_model_dir, "tiny-qwen2": str(q),
            "tiny-llama3": _variant(tiny_model_dir, root / "tiny-llama3", llama3),
            "tiny-linear-legacy": _variant(tiny_model_dir, root / "tiny-linear", legacy_linear)}


def _tensors(model) -> dict[str, torch.Tensor]:
    return {**dict(model.named_parameters(remove_duplicate=False)), **dict(model.named_buffers(remove_duplicate=False))}


def _greedy(model, eos: list[int], prompts: list[list[int]], n: int) -> list[list[int]]:
    async def run() -> list[list[int]]:
        engine = FastEngine(model, eos, max_batch=4, max_seq_len=96)
        await engine.start()
        try:
            async def one(i: int, p: list[int]) -> list[int]:
                req = GenerationRequest(request_id=f"r{i}", prompt_ids=p,
                                        params=SamplingParams(max_new_tokens=n, ignore_eos=True))
                return [ev.token_id async for ev in engine.submit(req) if ev.token_id is not None]
            return list(await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts))))
        finally:
            await engine.stop()
    return asyncio.run(run())


@pytest.mark.parametrize("quant", ["none", "bf16", "int4"])
@pytest.mark.parametrize("variant", ["tiny", "tiny-qwen2", "tiny-llama3", "tiny-linear-legacy"])
def test_native_build_matches_transformers(monkeypatch, model_dirs, variant, quant):
    monkeypatch.setenv("MODEL_SERVER_DIRECT_LOAD", "1")
    d = model_dirs[variant]
    ref = load_model(d, "cpu", quant)
    got = load_model(d, "cpu", quant, native=True)
    assert (ref.load_path, got.load_path) == ("direct", "native")
    assert type(got.model).__module__ == "model_server.native.modeling"
    assert type(got.model).__name__ == type(ref.model).__name__
    a, b = _tensors(ref.model), _tensors(got.model)
    assert a.keys() == b.keys()
    for k in a:      # parameters and buffers (rotary inv_freq / original_inv_freq; INT4 packed weights, scales)
        assert a[k].dtype == b[k].dtype and a[k].device == b[k].device and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k
        assert a[k].requires_grad == b[k].requires_grad, k
    for m in (ref.model, got.model):
        assert m.training is False
    tied = {(m.model.lm_head.weight is m.model.model.embed_tokens.weight) for m in (ref, got)
            if hasattr(m.model.lm_head, "weight")}
    assert len(tied) <= 1
    for field in ("dtype", "quantization", "architecture", "parameters", "weight_bytes", "context_length",
                  "eos_token_ids"):
        assert getattr(ref, field) == getattr(got, field), field
    for attr in ("eos_token_id", "do_sample", "temperature", "bos_token_id", "pad_token_id"):
        assert getattr(ref.model.generation_config, attr) == getattr(got.model.generation_config, attr), attr
    assert got.model.model.rotary_emb.attention_scaling == ref.model.model.rotary_emb.attention_scaling
    for attr in ("vocab_size", "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
                 "tie_word_embeddings", "eos_token_id", "use_sliding_window", "layer_types"):
        assert (getattr(ref.model.config, attr, None) or None) == (getattr(got.model.config, attr, None) or None), attr

    # the fast engine's forward: prefill logits bit for bit, then greedy tokens through the engine
    prompts = [[5, 17, 99, 300, 2, 41, 77, 8, 150], [3, 1, 250, 12]]
    logits = []
    for m in (ref.model, got.model):
        runner = ModelRunner(m, 2, 64, use_cuda_graphs=False, fuse=False)
        with torch.inference_mode():
            logits.append(runner.prefill([0, 1], prompts).clone())
    assert torch.equal(logits[0], logits[1])
    want = _greedy(ref.model, ref.eos_token_ids, prompts + [[7] * 20], 12)
    have = _greedy(got.model, got.eos_token_ids, prompts + [[7] * 20], 12)
    assert want == have and all(len(t) == 12 for t in want)


ROPES = [
    {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}},
    {"rope_parameters": {"rope_type": "default", "rope_theta": 1000000}, "head_dim": 48},
    {"rope_parameters": dict(LLAMA3)},
    {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}},
    {"rope_scaling": {"type": "linear", "factor": 4.0}, "rope_theta": 20000},
    {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 2.0, "high_freq_factor": 8.0},
     "rope_theta": 100000.0},
    {},                                                     # no RoPE keys at all: theta 10,000, default
]


@pytest.mark.parametrize("extra", ROPES, ids=[str(i) for i in range(len(ROPES))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_tables_match_transformers(extra, dtype):
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 256,
           "num_attention_heads": 4, "max_position_embeddings": 4096, **json.loads(json.dumps(extra))}
    assert ncfg.unsupported_reason(cfg) is None
    theirs = LlamaRotaryEmbedding(transformers.LlamaConfig(**{k: v for k, v in cfg.items() if k != "architectures"}))
    c = ncfg.parse(cfg)
    ours = rope.RotaryEmbedding(c.rope_parameters, c.head_dim, c.max_position_embeddings)
    ours.reset_buffers("cpu")
    assert theirs.rope_type == ours.rope_type and theirs.attention_scaling == ours.attention_scaling
    assert torch.equal(theirs.inv_freq, ours.inv_freq) and theirs.inv_freq.dtype == ours.inv_freq.dtype
    x = torch.zeros(1, dtype=dtype)
    pos = torch.arange(4096)[None, :]
    for t, o in zip(theirs(x, pos), ours(x, pos)):
        assert t.dtype == o.dtype == dtype and torch.equal(t, o)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norm_and_mlp_compute_like_transformers(dtype):
    from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

    torch.manual_seed(0)
    c = ncfg.parse({"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "intermediate_size": 96,
                    "num_attention_heads": 4, "rms_norm_eps": 1e-5})
    theirs_n, ours_n = LlamaRMSNorm(64, eps=1e-5).to(dtype), modeling.RMSNorm(64, 1e-5).to(dtype)
    with torch.no_grad():
        theirs_n.weight.normal_()
        ours_n.weight.copy_(theirs_n.weight)
    theirs_m = LlamaMLP(transformers.LlamaConfig(hidden_size=64, intermediate_size=96)).to(dtype)
    ours_m = modeling.MLP(c).to(dtype)
    ours_m.load_state_dict(theirs_m.state_dict())
    x = torch.randn(3, 5, 64, dtype=dtype) * 3
    with torch.no_grad():
        assert torch.equal(theirs_n(x), ours_n(x))
        assert torch.equal(theirs_m(x), ours_m(x))


def test_native_unsupported_reasons(tiny_model_dir, monkeypatch):
    cfg = json.loads((Path(tiny_model_dir) / "config.json").read_text())
    assert ncfg.unsupported_reason(cfg) is None
    cases = {
        "MistralForCausalLM": {**cfg, "architectures": ["MistralForCausalLM"], "model_type": "mistral"},
        "model_type": {**cfg, "model_type": "mistral"},
        "hidden_act": {**cfg, "hidden_act": "gelu"},
        "rope_type 'yarn'": {**cfg, "rope_parameters": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4}},
        "rope_type 'dynamic'": {**cfg, "rope_scaling": {"type": "dynamic", "factor": 2.0}},
        "partial_rotary_factor": {**cfg, "partial_rotary_factor": 0.5},
        "RoPE parameters missing": {**cfg, "rope_parameters": {"rope_type": "llama3", "factor": 8.0}},
        "sliding-window": {**cfg, "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
                           "use_sliding_window": True, "sliding_window": 64, "max_window_layers": 1},
    }
    for why, c in cases.items():
        reason = ncfg.unsupported_reason(c)
        assert reason is not None and why in reason, (why, reason)
    monkeypatch.setenv("MODEL_SERVER_NO_TRANSFORMERS", "0")
    assert ncfg.unsupported_reason(cfg) == "MODEL_SERVER_NO_TRANSFORMERS=0"


def test_native_path_falls_back_and_says_why(tmp_path, tiny_model_dir, monkeypatch, caplog):
    """A config the native build does not take gives transformers' direct path; a checkpoint key the model
    lacks gives from_pretrained (as the direct path does); each with its log line."""
    d = Path(_variant(tiny_model_dir, tmp_path / "yarn", lambda c: c.update(
        rope_parameters={"rope_type": "yarn", "factor": 2.0, "rope_theta": 10000.0})))
    with caplog.at_level(logging.INFO, logger="model_server.loading"):
        assert load_model(str(d), "cpu", "none", native=True).load_path == "direct"
    assert any("native model: no (rope_type 'yarn'" in r.getMessage() for r in caplog.records)
    e = tmp_path / "extra"
    shutil.copytree(tiny_model_dir, e)
    state = load_file(str(e / "model.safetensors"))
    state["model.extra_thing.weight"] = torch.zeros(4)
    save_file(state, str(e / "model.safetensors"), metadata={"format": "pt"})
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="model_server.loading"):
        assert load_model(str(e), "cpu", "none", native=True).load_path == "from_pretrained"
    assert any("load path: from_pretrained" in r.getMessage() and "unexpected" in r.getMessage()
               for r in caplog.records)


def test_native_load_imports_no_transformers(tiny_model_dir):
    """A fresh process: the native load (int4, pre-warm forced on) leaves transformers and torch._dynamo
    unimported, and the pre-warm ran on its own view of the tensors while the build consumed the state."""
    code = ("import sys; from model_server.loading import load_model; "
            f"m = load_model({tiny_model_dir!r}, 'cpu', 'int4', native=True); "
            "print(m.load_path, type(m.tokenizer).__name__, sorted(m.load_marks), "
            "[k for k in ('transformers', 'torch._dynamo', 'sympy') if k in sys.modules], "
            "m.load_marks['prewarm_end'] <= m.load_marks['quantize_start'] <= m.load_marks['quantize_end'])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**__import__("os").environ, "MODEL_SERVER_PREWARM": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    # the INT4 quantize starts once the load's threads are done, the pre-warm included (quantize_start)
    assert out.stdout.split("\n")[0] == ("native NativeTokenizer ['build_end', 'prewarm_end', 'quantize_end', "
                                         "'quantize_start', 'read_end'] [] True"), out.stdout + out.stderr[-2000:]
