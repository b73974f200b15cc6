"""``model-server synth``: build an offline model directory with a public model's real shape.

Owns the presets (shapes), the seeded random weights and the atomic, idempotent write of the
directory. The tokenizer is :mod:`model_server.synth_tokenizer`'s. This module must not load or
serve the model it writes.

The weights are random (seeded), the tokenizer is a byte-level BPE trained on local text (the Python
standard library's sources), and ``config.json`` carries ``"edge_eval_synthetic": true``. Speed, memory
and energy of such a model are real for its shape; its text is not.

Big presets never instantiate the model with real storage: the parameter names and shapes come from a
model built on the ``meta`` device, and each tensor is filled from its own seeded generator (in a thread
pool, so the 1B preset builds in seconds) and written straight to ``model.safetensors``.

Atomic and idempotent (a Kubernetes Job may run it again, or run while a server waits for the
model): the directory is built next to ``OUT_DIR`` under a temporary name and renamed into place
when complete, so ``OUT_DIR`` is either absent, the previous model, or the whole new one; when
``OUT_DIR`` already holds the same preset and seed (its ``edge_eval_synth.json``), nothing is written.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from model_server.synth_tokenizer import BOS_ID, EOS_ID, IM_END_ID, PAD_ID, SynthError, train_tokenizer


@dataclass(frozen=True)
class Preset:
    """A model shape. ``config`` holds the public model's config values (minus token ids)."""

    name: str
    architecture: str                  # "llama" | "qwen2"
    config: dict[str, Any]
    tokenizer_vocab: int               # BPE vocab size to train (<= config vocab_size)
    dtype: str                         # dtype the weights are saved in
    real_model: str = ""               # the public model whose shape this is
    match_vocab: bool = False          # tiny: model vocab_size = tokenizer size
    extra: dict[str, Any] = field(default_factory=dict)


PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        name="tiny",
        architecture="llama",
        config=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                    max_position_embeddings=512, rms_norm_eps=1e-5, tie_word_embeddings=True,
                    # std 0.1 (not 0.02): greedy text varies instead of repeating one token, so
                    # batching-equality tests can fail
                    initializer_range=0.1,
                    rope_parameters={"rope_type": "default", "rope_theta": 10000.0}),
        tokenizer_vocab=1024,
        dtype="float32",
        match_vocab=True,
    ),
    "tiny-qwen2": Preset(
        name="tiny-qwen2",
        architecture="qwen2",
        config=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                    rms_norm_eps=1e-6, tie_word_embeddings=False, use_sliding_window=False,
                    sliding_window=None, max_window_layers=2, initializer_range=0.1,
                    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
        tokenizer_vocab=1024,
        dtype="float32",
        match_vocab=True,
    ),
    "llama-3.2-1b": Preset(
        name="llama-3.2-1b",
        architecture="llama",
        real_model="meta-llama/Llama-3.2-1B",
        config=dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                    num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                    head_dim=64, max_position_embeddings=131072, rms_norm_eps=1e-5,
                    hidden_act="silu", tie_word_embeddings=True, attention_bias=False,
                    mlp_bias=False, initializer_range=0.02,
                    rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0,
                                     "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                     "original_max_position_embeddings": 8192}),
        tokenizer_vocab=8192,
        dtype="bfloat16",
    ),
    "qwen2.5-0.5b": Preset(
        name="qwen2.5-0.5b",
        architecture="qwen2",
        real_model="Qwen/Qwen2.5-0.5B",
        config=dict(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                    num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                    max_position_embeddings=32768, rms_norm_eps=1e-6, hidden_act="silu",
                    tie_word_embeddings=True, use_sliding_window=False, sliding_window=None,
                    max_window_layers=24, initializer_range=0.02,
                    rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
        tokenizer_vocab=8192,
        dtype="bfloat16",
    ),
}

# the tiny shape with the llama-3.2-1b preset's 16 layers: a decode step with the 1B model's number of ops at a
# CPU-friendly size (per-op host costs: the background compile's GIL share, launch overheads)
PRESETS["tiny-16l"] = replace(PRESETS["tiny"], name="tiny-16l", config={**PRESETS["tiny"].config, "num_hidden_layers": 16})


def _config_for(preset: Preset, vocab_size: int):
    from transformers import LlamaConfig, Qwen2Config

    kwargs = dict(preset.config)
    if preset.match_vocab:
        kwargs["vocab_size"] = vocab_size
    kwargs.update(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[preset.architecture]
    cfg = cls(**kwargs)
    cfg.dtype = preset.dtype
    return cfg


def _model_class(architecture: str):
    from transformers import LlamaForCausalLM, Qwen2ForCausalLM

    return {"llama": LlamaForCausalLM, "qwen2": Qwen2ForCausalLM}[architecture]


def _tensor_seed(seed: int, name: str) -> int:
    """A per-tensor seed: the weights don't depend on thread scheduling or tensor order."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") >> 1


def _random_state_dict(config, seed: int, dtype_name: str,
                       progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Seeded random tensors for every parameter of the model described by ``config``.

    Shapes come from a model built on the meta device (no storage). Linear/embedding weights are
    N(0, initializer_range); norm weights are 1; biases are 0.
    """
    import torch

    dtype = getattr(torch, dtype_name)
    with torch.device("meta"):
        meta = _model_class(config.model_type)(config)
    shapes = [(n, tuple(p.shape)) for n, p in meta.named_parameters()]  # tied weights listed once
    std = float(getattr(config, "initializer_range", 0.02))
    out: dict[str, Any] = {}

    def fill(item: tuple[str, tuple[int, ...]]) -> tuple[str, Any]:
        name, shape = item
        t = torch.empty(shape, dtype=dtype)
        if name.endswith("bias"):
            t.zero_()
        elif "norm" in name:
            t.fill_(1.0)
        else:
            t.normal_(0.0, std, generator=torch.Generator().manual_seed(_tensor_seed(seed, name)))
        if progress:
            progress(t.numel())
        return name, t

    torch_threads = torch.get_num_threads()
    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
        for name, t in pool.map(fill, shapes):
            out[name] = t
    torch.set_num_threads(torch_threads)
    return out


def synthesize(out_dir: str | os.PathLike, preset_name: str, seed: int = 0,
               show_progress: bool = True) -> Path:
    """Write a complete model directory for ``preset_name`` into ``out_dir`` and return its path."""
    import torch
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    if preset_name not in PRESETS:
        raise SynthError(f"unknown preset {preset_name!r}; choose one of {', '.join(PRESETS)}")
    preset = PRESETS[preset_name]
    final = Path(out_dir)
    if final.exists() and not final.is_dir():
        raise SynthError(f"{final} exists and is not a directory")
    if is_complete(final, preset.name, seed):
        return final
    if final.is_dir() and any(final.iterdir()) and not (final / "config.json").exists():
        raise SynthError(f"{final} is not empty and holds no model: refusing to replace it")
    if final.is_dir() and (final / "config.json").exists() and \
            not json.loads((final / "config.json").read_text()).get("edge_eval_synthetic"):
        raise SynthError(f"{final} holds a real (not synthetic) model: refusing to replace it")
    out = final.parent / f".{final.name}.partial"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    t0 = time.monotonic()

    fill_to = None if preset.match_vocab else int(preset.config["vocab_size"])
    tok = train_tokenizer(preset.tokenizer_vocab, max_bytes=600_000 if preset.match_vocab else 4_000_000,
                          fill_to=fill_to)
    vocab = len(tok)
    config = _config_for(preset, vocab)
    if vocab > config.vocab_size:
        raise SynthError(f"tokenizer vocab {vocab} exceeds model vocab {config.vocab_size}")

    if preset.match_vocab:
        torch.manual_seed(seed)
        model = _model_class(preset.architecture)(config).to(getattr(torch, preset.dtype))
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
    else:
        if show_progress:
            from rich.progress import Progress

            with torch.device("meta"):
                total = sum(p.numel() for p in _model_class(preset.architecture)(config).parameters())
            with Progress(transient=True) as bar:
                task = bar.add_task(f"random weights ({preset.name}, seed {seed})", total=total)
                state = _random_state_dict(config, seed, preset.dtype,
                                           progress=lambda n: bar.advance(task, n))
        else:
            state = _random_state_dict(config, seed, preset.dtype)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    n_params = sum(t.numel() for t in state.values())
    del state

    cfg = config.to_dict()
    cfg["architectures"] = [_model_class(preset.architecture).__name__]
    cfg["dtype"] = preset.dtype
    cfg["edge_eval_synthetic"] = True
    cfg["edge_eval_preset"] = preset.name
    cfg["edge_eval_seed"] = seed
    if preset.real_model:
        cfg["edge_eval_shape_of"] = preset.real_model
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")

    gen = GenerationConfig(bos_token_id=BOS_ID, eos_token_id=[EOS_ID, IM_END_ID], pad_token_id=PAD_ID,
                           do_sample=False, max_new_tokens=64)
    gen.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    (out / "edge_eval_synth.json").write_text(json.dumps({
        "preset": preset.name, "seed": seed, "parameters": n_params, "tokenizer_vocab": vocab,
        "model_vocab": config.vocab_size, "build_seconds": round(time.monotonic() - t0, 3),
        "shape_of": preset.real_model or None,
    }, indent=2) + "\n")
    _publish(out, final)
    return final


def is_complete(out: Path, preset_name: str, seed: int) -> bool:
    """True when ``out`` holds a finished synthetic model of this preset and seed (its marker file
    is written last, and the directory only appears by rename once complete)."""
    try:
        info = json.loads((out / "edge_eval_synth.json").read_text())
    except (OSError, ValueError):
        return False
    return info.get("preset") == preset_name and info.get("seed") == seed and (out / "model.safetensors").is_file()


def _publish(tmp: Path, final: Path) -> None:
    """Move the finished directory into place: rename (atomic on one file system), the old one removed."""
    if final.exists():
        old = final.parent / f".{final.name}.old"
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)
