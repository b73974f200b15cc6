"""The native model: Llama / Qwen2 causal LMs as plain ``nn.Module`` trees, without transformers.

Parameter names and shapes are transformers' (``model.embed_tokens``, ``model.layers.N.self_attn.q_proj``,
``...mlp.gate_proj``, ``model.norm``, ``lm_head``; Qwen2's q/k/v biases), so a checkpoint loads by name,
and the class names are the architectures' (the fast engine checks them). The modules hold what the fast
engine reads (:mod:`model_server.engines.fast.runner`: the linears, each norm's ``weight`` and
``variance_epsilon``, the attention's ``head_dim`` / ``scaling``, the rotary module) and what the server
and :mod:`model_server.int4` read (``config``, ``generation_config``, ``device``, ``dtype``). RMSNorm and the
MLP also have a ``forward`` computing what transformers' modules compute (float32 variance, cast back before
the weight; ``down(silu(gate) * up)``). The causal LM has no ``forward`` and no ``generate``: the fast engine
drives the layers itself. Owns the module tree; filling it is :mod:`.build`'s.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .config import GenerationDefaults, NativeConfig
from .rope import RotaryEmbedding


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        dtype = hidden_states.dtype
        h = hidden_states.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * h.to(dtype)


class Attention(nn.Module):
    """The projections and attention constants; the attention itself is the fast engine's."""

    def __init__(self, config: NativeConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim ** -0.5
        self.is_causal = True
        hidden, q_out = config.hidden_size, config.num_attention_heads * config.head_dim
        kv_out = config.num_key_value_heads * config.head_dim
        self.q_proj = nn.Linear(hidden, q_out, bias=config.qkv_bias)
        self.k_proj = nn.Linear(hidden, kv_out, bias=config.qkv_bias)
        self.v_proj = nn.Linear(hidden, kv_out, bias=config.qkv_bias)
        self.o_proj = nn.Linear(q_out, hidden, bias=config.o_bias)


class MLP(nn.Module):
    def __init__(self, config: NativeConfig) -> None:
        super().__init__()
        h, i, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(h, i, bias=bias)
        self.up_proj = nn.Linear(h, i, bias=bias)
        self.down_proj = nn.Linear(i, h, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: NativeConfig, layer_idx: int) -> None:
        super().__init__()
        self.hidden_size = config.hidden_size
        self.self_attn = Attention(config, layer_idx)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class DecoderModel(nn.Module):
    """``model.model``: embeddings, layers, final norm, rotary embedding."""

    def __init__(self, config: NativeConfig) -> None:
        super().__init__()
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        # given its weight, nn.Embedding skips its init: normal_() on a meta tensor imports torch._dynamo (~1.6 s)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id,
                                         _weight=torch.empty(config.vocab_size, config.hidden_size))
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.rope_parameters, config.head_dim, config.max_position_embeddings)


class NativeCausalLM(nn.Module):
    """``model.model`` (:class:`DecoderModel`) and ``model.lm_head``; ``config`` and ``generation_config``."""

    _tied_weights_keys: dict[str, str] | None = {"lm_head.weight": "model.embed_tokens.weight"}
    native = True                       # /info and the logs tell the two builds apart by this

    def __init__(self, config: NativeConfig) -> None:
        super().__init__()
        self.config = config
        self.model = DecoderModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.generation_config: GenerationDefaults | Any = None
        self.name_or_path = ""
        self.logical_parameters = 0     # set by .build before any quantization (model_server.weights reads it)

    def tie_weights(self) -> None:
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The first floating-point parameter's dtype (what transformers' ``model.dtype`` reports)."""
        for p in self.parameters():
            if p.is_floating_point():
                return p.dtype
        return torch.get_default_dtype()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens


class LlamaForCausalLM(NativeCausalLM):
    """Llama (and Llama 3.x) with transformers' parameter names."""


class Qwen2ForCausalLM(NativeCausalLM):
    """Qwen2 / Qwen2.5 (full attention) with transformers' parameter names."""


CLASSES: dict[str, type[NativeCausalLM]] = {"LlamaForCausalLM": LlamaForCausalLM, "Qwen2ForCausalLM": Qwen2ForCausalLM}


def build_on_meta(config: NativeConfig) -> NativeCausalLM:
    """The model of ``config`` with every parameter and buffer on the meta device (no storage, no init)."""
    with torch.device("meta"):
        return CLASSES[config.architectures[0]](config)
