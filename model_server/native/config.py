"""``config.json`` and ``generation_config.json`` read by hand, for the native model build.

Owns :class:`NativeConfig` (the fields the model build, the fast engine and the server read, with the
defaults ``LlamaConfig`` / ``Qwen2Config`` give a field that ``config.json`` leaves out), RoPE parameter
standardisation (``rope_scaling`` / ``rope_theta`` of older files into one ``rope_parameters`` dict, as
transformers does), :class:`GenerationDefaults`, and :func:`unsupported_reason`: which configs the native
build does not reproduce exactly (they go to transformers). It must not build modules or read weights.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from . import ENV, enabled

# transformers' field defaults (configuration_llama.py / configuration_qwen2.py, transformers 5)
_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=None, hidden_act="silu", max_position_embeddings=2048,
                  rms_norm_eps=1e-6, tie_word_embeddings=False, attention_bias=False, mlp_bias=False, head_dim=None,
                  bos_token_id=1, eos_token_id=2, pad_token_id=None),
    "qwen2": dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=32, hidden_act="silu", max_position_embeddings=32768,
                  rms_norm_eps=1e-6, tie_word_embeddings=False, use_sliding_window=False, sliding_window=4096,
                  max_window_layers=28, layer_types=None, bos_token_id=None, eos_token_id=None, pad_token_id=None),
}
ARCHITECTURES = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2"}
ROPE_TYPES = ("default", "linear", "llama3")
DEFAULT_THETA = 10_000.0
_ROPE_KEYS = {"linear": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor")}


@dataclass
class NativeConfig:
    """What ``model.config`` is on the native path (attribute names as in transformers' configs)."""

    architectures: list[str]
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    hidden_act: str
    max_position_embeddings: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    qkv_bias: bool                 # Llama: attention_bias; Qwen2: always
    o_bias: bool                   # Llama: attention_bias; Qwen2: never
    mlp_bias: bool
    rope_parameters: dict[str, Any]
    bos_token_id: Any = None
    eos_token_id: Any = None
    pad_token_id: Any = None
    use_sliding_window: bool = False
    layer_types: list[str] | None = None    # Qwen2's per-layer attention kinds (Llama's config has none)
    dtype: Any = None              # a torch dtype once loaded; config.json's name before
    quantization_config: Any = None
    _name_or_path: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["dtype"] = str(self.dtype).replace("torch.", "") if self.dtype is not None else None
        return d


@dataclass
class GenerationDefaults:
    """``model.generation_config``: ``generation_config.json`` as stored (missing fields read as None), or the
    model config's token ids when there is no file (what transformers' ``from_model_config`` keeps)."""

    values: dict[str, Any]

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return self.__dict__["values"].get(name)


def read_json(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError(f"{path.name} is not a JSON object")
    return data


def rope_parameters(cfg: dict[str, Any]) -> dict[str, Any]:
    """One flat RoPE dict as transformers standardises it: ``rope_scaling`` (older files) or ``rope_parameters``,
    ``rope_theta`` (default 10,000) and ``partial_rotary_factor`` from the top level where the dict lacks them,
    ``rope_type`` from ``type``, and llama3's original context (top-level value first, else max positions)."""
    rp = dict(cfg.get("rope_scaling") or cfg.get("rope_parameters") or {})
    rp.setdefault("rope_theta", cfg.get("rope_theta", DEFAULT_THETA))
    if cfg.get("partial_rotary_factor") is not None:
        rp.setdefault("partial_rotary_factor", cfg["partial_rotary_factor"])
    rp.setdefault("rope_type", rp.get("type", "default"))
    if rp["rope_type"] in ("llama3", "yarn", "longrope"):
        if "original_max_position_embeddings" in cfg:
            rp["original_max_position_embeddings"] = cfg["original_max_position_embeddings"]
        else:
            rp.setdefault("original_max_position_embeddings", cfg.get("max_position_embeddings"))
    return rp


def unsupported_reason(cfg: dict[str, Any] | None) -> str | None:
    """Why the native build does not take this ``config.json`` (None: it does). Checked before any weight is
    read; :mod:`model_server.fast_load` has already checked the files, the quantization and custom code."""
    if not enabled():
        return f"{ENV}=0"
    if cfg is None:
        return "no config.json"
    archs = cfg.get("architectures") or []
    if len(archs) != 1 or archs[0] not in ARCHITECTURES:
        return f"architecture {archs[0] if archs else None} (native: {', '.join(ARCHITECTURES)})"
    if cfg.get("model_type") != ARCHITECTURES[archs[0]]:
        return f"model_type {cfg.get('model_type')!r} with {archs[0]}"
    if (cfg.get("hidden_act") or "silu") != "silu":
        return f"hidden_act {cfg.get('hidden_act')!r}"
    for key in ("per_layer_config", "quantization_config", "auto_map"):
        if cfg.get(key) and not (key == "quantization_config" and _repackable(cfg)):
            return f"{key} in config.json"
    rp = rope_parameters(cfg)
    if not isinstance(rp, dict) or any(isinstance(v, dict) for v in rp.values()):
        return "per-layer RoPE parameters"
    if rp["rope_type"] not in ROPE_TYPES:
        return f"rope_type {rp['rope_type']!r} (native: {', '.join(ROPE_TYPES)})"
    if rp.get("partial_rotary_factor") not in (None, 1, 1.0):
        return "partial_rotary_factor"
    missing = [k for k in _ROPE_KEYS.get(rp["rope_type"], ()) if rp.get(k) is None]
    if missing or rp.get("rope_theta") is None:
        return f"RoPE parameters missing: {missing or ['rope_theta']}"
    try:
        c = parse(cfg)
    except (TypeError, ValueError, KeyError) as exc:
        return f"config.json: {type(exc).__name__}: {exc}"
    if c.use_sliding_window or any(t != "full_attention" for t in c.layer_types or []):
        return "sliding-window layers"
    if c.num_attention_heads % c.num_key_value_heads or c.head_dim % 2:
        return "head layout"
    return None


def _repackable(cfg: dict[str, Any]) -> bool:
    """A GPTQ or AWQ checkpoint the build repacks into INT4 linears (:mod:`model_server.int4_repack`)."""
    from model_server.int4_repack import unsupported_reason as repack_reason

    return repack_reason(cfg) is None


def parse(cfg: dict[str, Any]) -> NativeConfig:
    """:class:`NativeConfig` of a ``config.json`` dict (LlamaConfig's / Qwen2Config's defaults for missing fields)."""
    kind = ARCHITECTURES[(cfg.get("architectures") or [""])[0]]
    v = {**_DEFAULTS[kind], **{k: cfg[k] for k in _DEFAULTS[kind] if k in cfg}}
    heads = int(v["num_attention_heads"])
    kv = int(v["num_key_value_heads"] if v["num_key_value_heads"] is not None else heads)
    hidden = int(v["hidden_size"])
    if kind == "llama":
        head_dim = int(v["head_dim"] if v["head_dim"] is not None else hidden // heads)
        qkv_bias = o_bias = bool(v["attention_bias"])
        mlp_bias = bool(v["mlp_bias"])
        sliding, types = False, None
    else:
        head_dim = int(cfg.get("head_dim") or hidden // heads)
        qkv_bias, o_bias, mlp_bias = True, False, False
        sliding = bool(v["use_sliding_window"])
        window = v["sliding_window"] if sliding else None
        types = v["layer_types"] or ["sliding_attention" if window is not None and i >= int(v["max_window_layers"])
                                     else "full_attention" for i in range(int(v["num_hidden_layers"]))]
    return NativeConfig(
        architectures=list(cfg["architectures"]), model_type=kind, vocab_size=int(v["vocab_size"]),
        hidden_size=hidden, intermediate_size=int(v["intermediate_size"]),
        num_hidden_layers=int(v["num_hidden_layers"]), num_attention_heads=heads, num_key_value_heads=kv,
        head_dim=head_dim, hidden_act=str(v["hidden_act"]), max_position_embeddings=int(v["max_position_embeddings"]),
        rms_norm_eps=float(v["rms_norm_eps"]), tie_word_embeddings=bool(v["tie_word_embeddings"]),
        qkv_bias=qkv_bias, o_bias=o_bias, mlp_bias=mlp_bias, rope_parameters=rope_parameters(cfg),
        bos_token_id=v["bos_token_id"], eos_token_id=v["eos_token_id"], pad_token_id=v["pad_token_id"],
        use_sliding_window=sliding, layer_types=None if types is None else list(types),
        dtype=cfg.get("dtype") if cfg.get("dtype") is not None else cfg.get("torch_dtype"))


def generation_defaults(model_dir: Path, config: NativeConfig) -> GenerationDefaults:
    """``generation_config.json`` as stored, else the model config's bos/eos/pad ids."""
    path = model_dir / "generation_config.json"
    if path.is_file():
        return GenerationDefaults(read_json(path))
    return GenerationDefaults({"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
                               "pad_token_id": config.pad_token_id})
