"""Load a model + tokenizer through transformers 5 and describe it as loaded (weights, dtype, devices).

Owns loading and :class:`LoadedModel`; what ``from_pretrained`` is given for each ``--quantization`` is
:mod:`model_server.quantization`'s.
Counting what the loaded tensors hold is :mod:`model_server.weights`'s; this module must not run
generation (one settling forward for GPTQ kernels excepted) or pick an engine.

Quantization choices:
* ``none``: the checkpoint's own dtype (or its own pre-quantized format, e.g. a GPTQ checkpoint; with the fast
  engine GPTQ and AWQ checkpoints are repacked onto the INT4 kernels, :mod:`model_server.int4_repack`);
* ``fp16`` / ``bf16``: cast on load;
* ``nf4``: bitsandbytes 4-bit NF4 with double quantization (the paper's INT4 path);
* ``int8``: bitsandbytes LLM.int8();
* ``int4``: group-wise INT4 weight-only from a bf16/fp16 checkpoint at load, PyTorch's int4pack kernels
  (see :mod:`model_server.int4`; compute dtype bf16, fp16 below compute capability 8.0);
* ``gptq``: a pre-quantized GPTQ checkpoint. With the fast engine (the native build) its 4-bit linears are
  repacked into the INT4 kernels' layout (:mod:`model_server.int4_repack`, no gptqmodel); otherwise through
  gptqmodel + optimum (auto-gptq cannot import with transformers 5; see docs/model_server.md).
"""
from __future__ import annotations

import json
import logging
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from model_server.quantization import (  # noqa: F401 - LoadError and default_compute_dtype re-exported
    LoadError, default_compute_dtype, quant_method_name, quantization_kwargs)

log = logging.getLogger("model_server.loading")


@dataclass
class LoadedModel:
    """What an engine needs, plus what /info reports. Engines get this object."""

    model: Any                       # a transformers PreTrainedModel (causal LM) or model_server.native's, eval mode
    tokenizer: Any                   # a transformers tokenizer or model_server.native's
    model_id: str                    # the MODEL argument
    device_type: str                 # "cpu" | "cuda"
    dtype: str                       # compute dtype name, e.g. "bfloat16"
    quantization: str                # none|fp16|bf16|nf4|int8|gptq
    architecture: str                # e.g. "LlamaForCausalLM"
    parameters: int                  # logical parameter count (unpacked)
    weight_bytes: int                # bytes of parameters + persistent buffers as loaded
    context_length: int              # max_position_embeddings (or tokenizer limit)
    eos_token_ids: list[int] = field(default_factory=list)
    synthetic: bool = False
    devices: list[dict[str, Any]] = field(default_factory=list)
    load_path: str = "from_pretrained"   # "native" | "direct" (model_server.fast_load) | "from_pretrained"
    token_byte_facts: tuple[int, Any] | None = None   # api_common.token_byte_facts(tokenizer), worked out at load
    # wall-clock epochs of load sub-phase ends: cuda_init_end, read_end, build_end (direct path), prewarm_end,
    # quantize_start and quantize_end (int4: it starts once the load's threads are done, the pre-warm included)
    load_marks: dict[str, float] = field(default_factory=dict)

    @property
    def device(self):
        return self.model.device


def resolve_device(requested: str) -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise LoadError("--device cuda requested but torch sees no CUDA device")
    return requested


def _read_local_config(model_id: str) -> dict[str, Any] | None:
    path = Path(model_id) / "config.json"
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise LoadError(f"cannot read {path}: {exc}") from None
    return None


def check_model_argument(model_id: str) -> None:
    """Fail fast (before listening) on a MODEL that can't possibly load."""
    path = Path(model_id)
    looks_local = model_id.startswith((".", "/", "~")) or path.exists() or model_id.count("/") > 1
    if looks_local:
        if not path.is_dir():
            raise LoadError(f"model directory not found: {model_id}")
        if not (path / "config.json").is_file():
            raise LoadError(f"{model_id} has no config.json (not a Hugging Face model directory)")


def _load_weights(model_id: str, device: str, kwargs: dict[str, Any], marks: dict[str, float],
                  reason: str | None, read: Any, native: bool = False,
                  fallback_kwargs: Any = None) -> tuple[Any, str]:
    """The model, by the direct path (:mod:`model_server.fast_load`; ``read`` is the future of its
    weights; ``native``: built by :mod:`model_server.native`, no transformers) unless ``reason`` says why
    not or it finds one, else by ``from_pretrained`` (with ``fallback_kwargs()`` where given: a GPTQ or AWQ
    checkpoint the native build could not repack needs gptqmodel there); logs which path was used and why.
    Returns ``(model, path name)``: ``native``, ``direct`` or ``from_pretrained``."""
    from model_server import fast_load

    if reason is None:
        try:
            model = fast_load.load_direct(model_id, device, kwargs["dtype"], marks, read.result(), native=native)
            if native:
                log.info("load path: native (safetensors onto %s, model built without transformers)", device)
                return model, "native"
            log.info("load path: direct (safetensors onto %s)", device)
            return model, "direct"
        except fast_load.DirectLoadUnsupported as exc:
            reason = str(exc)
        except Exception as exc:
            raise LoadError(f"cannot load model from {model_id}: {type(exc).__name__}: "
                            f"{str(exc).splitlines()[0][:300] if str(exc) else ''}") from None
    log.info("load path: from_pretrained (%s)", reason)
    if fallback_kwargs is not None:
        kwargs = fallback_kwargs()
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(model_id, device_map=device, **kwargs)
    except LoadError:
        raise
    except Exception as exc:
        raise LoadError(f"cannot load model from {model_id}: {type(exc).__name__}: "
                        f"{str(exc).splitlines()[0][:300] if str(exc) else ''}") from None
    return model, "from_pretrained"


def _repack_hint(config: dict[str, Any] | None, native: bool) -> str:
    """For a load that failed outside the native build: a GPTQ/AWQ checkpoint it could have repacked says so."""
    if native or not (config or {}).get("quantization_config"):
        return ""
    from model_server.int4_repack import unsupported_reason

    return "" if unsupported_reason(config) else " (or serve it with --engine fast, which repacks it onto its INT4 kernels)"


def _tokenizer_job(model_id: str, native: bool) -> tuple[Any, tuple[int, Any]]:
    """The tokenizer and its :func:`~model_server.api_common.token_byte_facts` (the vocabulary scan, off the ready path)."""
    from model_server.api_common import token_byte_facts
    from model_server.native.select import load_tokenizer

    tok = load_tokenizer(model_id, native)
    return tok, token_byte_facts(tok)


def load_model(model_id: str, device: str, quantization: str, native: bool = False) -> LoadedModel:
    """Load ``model_id`` (local dir or hub id) on ``device`` ("cpu"/"cuda") with ``quantization``.

    On the direct path the CUDA context and the weights' read start on a worker thread before
    transformers is imported; the tokenizer loads on another while the model is built, and (CUDA) a
    third pre-warms the fast engine's eager kernels on the read weights (``prewarm_end``). ``native``
    (``serve --engine fast``): model and tokenizer without transformers where :mod:`model_server.native`
    reproduces them (``load_path`` ``native``), else as without it."""
    import torch

    from model_server import fast_load

    config = _read_local_config(model_id)
    t0 = time.monotonic()
    marks: dict[str, float] = {}
    reason = fast_load.unsupported_reason(model_id, quantization, config)
    if native:
        from model_server.native.config import unsupported_reason as native_reason

        why = fast_load.unsupported_reason(model_id, quantization, config, repack=True) or native_reason(config)
        if why is not None:
            log.info("native model: no (%s)", why)
        native = why is None
        reason = None if native else reason
    repacked = native and bool((config or {}).get("quantization_config"))      # GPTQ/AWQ into INT4 linears
    view: Future = Future()     # the pre-warm's own dict of the read tensors (the build casts and clears its own)
    with ThreadPoolExecutor(max_workers=3, thread_name_prefix="load") as pool:
        read = pool.submit(fast_load.read_weights, model_id, device, marks, view) if reason is None else None
        try:
            kwargs = quantization_kwargs(quantization, device, config, int4_repacked=repacked)
        except LoadError as exc:
            raise LoadError(f"{exc}{_repack_hint(config, native)}") from None
        from model_server.engines.fast import prewarm     # torch only

        if read is not None and prewarm.enabled(device):   # one-off kernel costs, paid while the model is built
            pool.submit(prewarm.prewarm_quietly, config, view, kwargs["dtype"], quantization, marks, True)
        from model_server.weights import count_parameters, measure_weight_bytes

        if not native:          # transformers is imported here, on this thread, as before the native path
            from transformers import AutoTokenizer  # noqa: F401

            from model_server.log_setup import adopt_transformers_logging

            adopt_transformers_logging()
        tok_future = pool.submit(_tokenizer_job, model_id, native)
        try:
            fallback = (lambda: quantization_kwargs(quantization, device, config)) if repacked else None
            model, load_path = _load_weights(model_id, device, kwargs, marks, reason, read, native, fallback)
        except LoadError as exc:
            raise LoadError(f"{exc}{_repack_hint(config, native)}") from None
        finally:
            tok_error = tok_future.exception()
        if tok_error is not None:
            raise LoadError(f"cannot load tokenizer from {model_id}: {str(tok_error).splitlines()[0][:300]}")
        tokenizer, byte_facts = tok_future.result()
    model.eval()
    repacked = repacked and load_path == "native"
    cfg = model.config
    qcfg = getattr(cfg, "quantization_config", None)
    qdict = (qcfg if isinstance(qcfg, dict) else qcfg.to_dict()) if qcfg is not None else {}
    if quant_method_name(qdict.get("quant_method")) == "gptq" and not repacked:
        try:
            from model_server.gptq import settle_gptq_kernels

            settle_gptq_kernels(model, tokenizer)
        except Exception as exc:
            raise LoadError(f"GPTQ kernels failed on a first forward: {type(exc).__name__}: "
                            f"{str(exc).splitlines()[0][:300] if str(exc) else ''}") from None
    n_params = count_parameters(model, config)      # before INT4 unties a tied lm_head (its copy is not a parameter)
    if quantization == "int4":
        from model_server.int4 import quantize_model

        marks["quantize_start"] = time.time()
        head = os.environ.get("MODEL_SERVER_INT4_LM_HEAD", "1").strip() or "1"
        if head not in ("0", "1"):
            raise LoadError(f"MODEL_SERVER_INT4_LM_HEAD must be 1 (INT4, the default) or 0 (the compute dtype), "
                            f"not {head!r}")
        try:
            quantize_model(model, group_size=int(os.environ.get("MODEL_SERVER_INT4_GROUP_SIZE", "128")),
                           lm_head=head == "1")
        except ValueError as exc:
            raise LoadError(f"--quantization int4: {exc}") from None
        if device == "cuda":
            torch.cuda.synchronize()
        marks["quantize_end"] = time.time()
    if device == "cuda":
        torch.cuda.synchronize()
    log.info("loaded %s in %.2f s (%s)", model_id, time.monotonic() - t0, load_path)

    if quantization == "none" and qcfg is not None:
        reported_q = quant_method_name(qdict.get("quant_method")) or "none"
        if reported_q == "bitsandbytes":
            reported_q = "nf4" if qdict.get("load_in_4bit") else "int8"
    else:
        reported_q = quantization
    if reported_q in ("nf4",):
        dtype = str(getattr(getattr(model, "config", None), "dtype", model.dtype)).replace("torch.", "")
    else:
        dtype = str(model.dtype).replace("torch.", "")
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = cfg.eos_token_id if cfg.eos_token_id is not None else tokenizer.eos_token_id
    eos_ids = [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None]
    ctx = int(getattr(cfg, "max_position_embeddings", 0) or 0) or int(min(tokenizer.model_max_length, 1 << 20))
    indices = None
    if device == "cuda":
        indices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    from model_server.gpu import describe_devices

    return LoadedModel(
        model=model, tokenizer=tokenizer, model_id=model_id, device_type=device, dtype=dtype,
        quantization=reported_q, architecture=(cfg.architectures or [type(model).__name__])[0],
        parameters=n_params, weight_bytes=measure_weight_bytes(model),
        context_length=ctx, eos_token_ids=eos_ids,
        synthetic=bool((config or {}).get("edge_eval_synthetic", False)),
        devices=describe_devices(device, indices), load_path=load_path, load_marks=marks, token_byte_facts=byte_facts,
    )
