"""Direct load: build the model on the meta device and put a single safetensors file straight onto its device.

``transformers``' ``from_pretrained`` handles every checkpoint layout, quantizer and device map, and
pays for it at every start (key renaming and conversion machinery, allocator warm-up, initialising
weights it then overwrites). For the common case a model server meets (one ``model.safetensors``, an
architecture whose weights load by name, no pre-quantized checkpoint) this module does the same
thing with less: ``from_config`` on the meta device (no weight init), ``safetensors.torch.load_file``
onto the target device, cast to the target dtype there, ``load_state_dict(assign=True)`` (no copy),
recompute the non-persistent buffers (rotary ``inv_freq``) with the model's own ``_init_weights`` (as
``from_pretrained`` does), tie the embeddings, read ``generation_config.json``.

Owns deciding whether the direct path applies (:func:`unsupported_reason`) and doing it
(:func:`read_weights`, then :func:`load_direct`, which builds transformers' model or, for the fast engine's
common case, :mod:`model_server.native`'s). Anything it does not handle raises :class:`DirectLoadUnsupported` with the
reason, and :mod:`model_server.loading` falls back to ``from_pretrained``. It must not quantize or
pick dtypes (the caller gives the dtype; INT4 quantization is :mod:`model_server.int4`'s).
``MODEL_SERVER_DIRECT_LOAD=0`` turns it off.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("model_server.fast_load")

# architectures whose checkpoints load by parameter name, with no key conversion in transformers 5
# (the fast engine's two, plus their close relatives); anything else goes through from_pretrained
DIRECT_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM", "Qwen3ForCausalLM")
DIRECT_QUANTIZATIONS = ("none", "fp16", "bf16", "int4")
WEIGHTS_NAME = "model.safetensors"


class DirectLoadUnsupported(Exception):
    """The direct path does not handle this checkpoint; the message says why (for the log line)."""


def enabled() -> bool:
    return os.environ.get("MODEL_SERVER_DIRECT_LOAD", "1").strip() != "0"


def unsupported_reason(model_id: str, quantization: str, config: dict[str, Any] | None,
                       repack: bool = False) -> str | None:
    """Why the direct path cannot load this model (None: it can). Reads only config.json and file names.
    ``repack``: the caller builds the native model, which takes a GPTQ or AWQ checkpoint that
    :mod:`model_server.int4_repack` can repack (with ``--quantization none``, or ``gptq`` for GPTQ)."""
    if not enabled():
        return "MODEL_SERVER_DIRECT_LOAD=0"
    path = Path(model_id)
    if config is None or not path.is_dir():
        return "not a local model directory"
    method = str((config.get("quantization_config") or {}).get("quant_method", "")).lower()
    if repack and method and (quantization == "none" or quantization == method == "gptq"):
        from model_server.int4_repack import unsupported_reason as repack_reason

        why = repack_reason(config)
        if why is not None:
            return f"pre-quantized checkpoint ({why})"
    elif quantization not in DIRECT_QUANTIZATIONS:
        return f"--quantization {quantization}"
    elif config.get("quantization_config"):
        return "pre-quantized checkpoint"
    archs = config.get("architectures") or []
    if len(archs) != 1 or archs[0] not in DIRECT_ARCHITECTURES:
        return f"architecture {archs[0] if archs else None} (direct: {', '.join(DIRECT_ARCHITECTURES)})"
    if config.get("auto_map"):
        return "custom code (auto_map)"
    if not (path / WEIGHTS_NAME).is_file():
        if (path / f"{WEIGHTS_NAME}.index.json").is_file():
            return "sharded checkpoint"
        return f"no {WEIGHTS_NAME}"
    return None


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _read(path: str, device: str, load_file: Any) -> dict[str, Any]:
    """``load_file(path, device=device)``, or with ``MODEL_SERVER_STAGED_READ=1`` :mod:`model_server.staged_read`'s
    reader (a file it does not take: ``load_file``, with a log line saying why)."""
    from model_server.switches import flag

    if flag("MODEL_SERVER_STAGED_READ"):
        from model_server import staged_read

        try:
            return staged_read.read_file(path, device)
        except staged_read.StagedReadError as exc:
            log.warning("staged read of %s not used (%s); reading it with safetensors' load_file", path, exc)
    return load_file(path, device=device)


def read_weights(model_id: str, device: str, marks: dict[str, float], view: Any = None) -> dict[str, Any]:
    """Create the CUDA context (CUDA) and read the checkpoint's tensors onto ``device``, as stored.

    Needs only torch and safetensors, so :mod:`model_server.loading` runs it on a worker thread while
    the main thread imports transformers (file reads and host-to-device copies release the GIL).
    Marks ``cuda_init_end`` (CUDA only) and ``read_end``. ``view`` (a ``concurrent.futures.Future``)
    gets a dict of its own holding the same tensors before this returns, so a reader on another thread
    (the kernel pre-warm) never sees :func:`load_direct` cast or clear the returned one."""
    import torch
    from safetensors.torch import load_file

    try:
        if device == "cuda":
            torch.cuda.init()
            torch.empty(1, device="cuda")           # the CUDA context, timed on its own
            _sync(device)
            marks["cuda_init_end"] = time.time()
        state = _read(str(Path(model_id) / WEIGHTS_NAME), device, load_file)
        _sync(device)
        marks["read_end"] = time.time()
    except BaseException as exc:
        if view is not None:
            view.set_exception(exc)
        raise
    if view is not None:
        view.set_result(dict(state))
    return state


def load_direct(model_id: str, device: str, dtype: Any, marks: dict[str, float], state: dict[str, Any],
                native: bool = False) -> Any:
    """The model of ``model_id`` on ``device`` in ``dtype`` (``"auto"``: the checkpoint's), eval mode,
    from ``state`` (:func:`read_weights`'s result, consumed: cast in place, then assigned). ``native``: our own
    module tree (:mod:`model_server.native`, no transformers import) instead of transformers' model.

    Marks ``build_end`` (the model assembled). Raises :class:`DirectLoadUnsupported` (the tensors
    freed) where only loading shows it: missing or unexpected keys, meta tensors left, fp32 modules.
    """
    import torch

    try:
        if native:
            from model_server.native.build import build_native

            model = build_native(model_id, device, dtype, state)
        else:
            model = _build_transformers(model_id, device, dtype, state)
    except DirectLoadUnsupported:
        state.clear()               # free the device memory before the fallback loads
        model = None
        if device == "cuda":
            torch.cuda.empty_cache()
        raise
    state.clear()
    _sync(device)
    marks["build_end"] = time.time()
    return model


def _build_transformers(model_id: str, device: str, dtype: Any, state: dict[str, Any]) -> Any:
    """transformers' model class built on the meta device and filled from ``state``; eval mode."""
    import torch
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig
    from transformers.initialization import no_init_weights

    cfg = AutoConfig.from_pretrained(model_id)
    if dtype == "auto":
        dtype = _checkpoint_dtype(cfg, Path(model_id) / WEIGHTS_NAME, safe_open)
    with torch.device("meta"), no_init_weights():
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    if getattr(model, "_keep_in_fp32_modules", None):
        raise DirectLoadUnsupported("the model keeps some modules in fp32")
    for k, t in state.items():
        if t.is_floating_point() and t.dtype != dtype:
            state[k] = t.to(dtype)
    _assemble(model, state, device)
    model.config._name_or_path = str(model_id)
    model.name_or_path = str(model_id)
    if (Path(model_id) / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(model_id)
    model.eval()
    return model


def _checkpoint_dtype(cfg: Any, path: Path, safe_open: Any) -> Any:
    """What ``dtype="auto"`` resolves to: config.json's ``dtype``, else the first floating weight's."""
    import torch

    want = getattr(cfg, "dtype", None)
    if isinstance(want, str):
        want = getattr(torch, want, None)
    if isinstance(want, torch.dtype):
        return want
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            sl = f.get_slice(key)
            dt = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}.get(sl.get_dtype())
            if dt is not None:
                return dt
    raise DirectLoadUnsupported("cannot tell the checkpoint's dtype")


def check_keys(expected: set[str], stored: set[str], tied: set[str]) -> None:
    """The checkpoint's keys are the model's, less its tied ones (which must not be stored); else
    :class:`DirectLoadUnsupported` naming a few of the differences."""
    missing = expected - stored - tied
    unexpected = stored - expected
    if missing or unexpected:
        raise DirectLoadUnsupported(f"keys differ from the model's: missing {sorted(missing)[:3]}, "
                                    f"unexpected {sorted(unexpected)[:3]}")
    if tied & stored:
        raise DirectLoadUnsupported(f"tied weights stored in the checkpoint: {sorted(tied & stored)[:3]}")


def _assemble(model: Any, state: dict[str, Any], device: str) -> None:
    """Assign the loaded tensors, tie, recompute non-persistent buffers; every tensor must end off meta."""
    import torch

    tied = set(getattr(model, "all_tied_weights_keys", {}) or {}) if model.config.tie_word_embeddings else set()
    check_keys(set(model.state_dict().keys()), set(state), tied)
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    # non-persistent buffers (rotary inv_freq): a device placeholder, then the model's own init, which
    # computes them on the CPU and copies (what from_pretrained does)
    owners = set()
    for name, buf in list(model.named_buffers()):
        if buf.is_meta:
            mod_name, _, attr = name.rpartition(".")
            mod = model.get_submodule(mod_name)
            mod._buffers[attr] = torch.empty_like(buf, device=device)
            owners.add(mod_name)
    for mod_name in sorted(owners):
        model._init_weights(model.get_submodule(mod_name))
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise DirectLoadUnsupported(f"tensors left on the meta device: {left[:3]}")
    for p in model.parameters():
        p.requires_grad_(True)      # as from_pretrained leaves them (eval mode, grads enabled)
