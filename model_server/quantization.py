"""What ``from_pretrained`` is given for each ``--quantization`` choice, and the compute dtypes behind them.

Owns the mapping of ``none|fp16|bf16|nf4|int8|int4|gptq`` to transformers' keyword arguments (dtype,
``BitsAndBytesConfig``), the refusals (an already quantized checkpoint, bitsandbytes missing, a GPTQ
choice without a GPTQ checkpoint) as one-line :class:`LoadError` errors, and the compute dtype below and
above compute capability 8.0. It must not load anything (:mod:`model_server.loading` does).
"""
from __future__ import annotations

import logging
import sys
from typing import Any

_BNB_HUB_KERNEL_LOGGER = "bitsandbytes.backends.cpu.ops"
_BNB_HUB_KERNEL_WARNING = "Failed to load CPU gemm_4bit_forward from kernels-community"


class LoadError(Exception):
    """A one-line, user-facing load failure."""


def import_bitsandbytes() -> Any:
    """``import bitsandbytes`` (its ImportError and other failures propagate), without the kernel download that
    its import tries on a CPU with AVX512-BF16.

    There, bitsandbytes (0.50.2 does) asks the ``kernels`` package for a CPU GEMM from the Hugging Face Hub
    (kernels-community/quantization-bitsandbytes) and, when that fails (offline; a publisher it cannot verify,
    kernels 0.19; ``kernels`` not installed; it is a dependency of transformers from 5.25), logs a warning line to
    stderr and uses its own CPU kernel. Nothing here loads code from a hub at run time, and a CLI's error is one
    line: ``kernels`` is hidden from that import and that one warning dropped. peft imports bitsandbytes when it
    is installed, so call this before importing peft."""
    if "bitsandbytes" in sys.modules:
        return sys.modules["bitsandbytes"]
    log = logging.getLogger(_BNB_HUB_KERNEL_LOGGER)

    def drop(record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_BNB_HUB_KERNEL_WARNING)
    log.addFilter(drop)
    missing = object()
    kernels = sys.modules.get("kernels", missing)
    sys.modules["kernels"] = None          # type: ignore[assignment]  # "from kernels import ..." raises ImportError
    try:
        import bitsandbytes
    finally:
        if kernels is missing:
            sys.modules.pop("kernels", None)
        else:
            sys.modules["kernels"] = kernels
        log.removeFilter(drop)
    return bitsandbytes


def quant_method_name(value: Any) -> str:
    """``quant_method`` as a plain lower-case name.

    config.json holds a string, but ``model.config.quantization_config.to_dict()`` holds transformers'
    ``QuantizationMethod`` enum, whose ``str()`` is ``"QuantizationMethod.GPTQ"``.
    """
    return str(getattr(value, "value", value) or "").lower()


def default_compute_dtype(capability: tuple[int, int] | None) -> str:
    """Compute dtype for NF4 / LoRA compute: ``float16`` below compute capability 8.0 (T4, V100:
    bf16 is only emulated there, which made the paper's QLoRA 7x dearer than LoRA), ``bfloat16``
    from 8.0 (Ampere and newer) and on CPU (``capability`` None)."""
    if capability is not None and tuple(capability) < (8, 0):
        return "float16"
    return "bfloat16"


def _bnb_compute_dtype(device_type: str):
    import torch

    if device_type == "cuda":
        # not torch.cuda.is_bf16_supported(): it says True on a T4, where bf16 is emulated
        return getattr(torch, default_compute_dtype(torch.cuda.get_device_capability()))
    return torch.bfloat16


def quantization_kwargs(quantization: str, device_type: str, config: dict[str, Any] | None,
                        int4_repacked: bool = False) -> dict[str, Any]:
    """``int4_repacked``: a GPTQ or AWQ checkpoint that :mod:`model_server.int4_repack` turns into INT4 linears (the
    native build): no gptqmodel, and the rest of the model in the INT4 kernels' compute dtype."""
    import torch

    existing = (config or {}).get("quantization_config") or {}
    method = quant_method_name(existing.get("quant_method", ""))
    if method in ("gptq", "awq") and quantization in ("none", "gptq") and int4_repacked:
        from model_server.int4 import choose_compute

        cap = torch.cuda.get_device_capability() if device_type == "cuda" else None
        return {"dtype": choose_compute(device_type, cap).dtype}
    if method == "gptq" and quantization in ("none", "gptq"):
        from model_server.gptq import prepare_gptq

        prepare_gptq()
    if quantization == "none":
        return {"dtype": "auto"}
    if quantization == "fp16":
        return {"dtype": torch.float16}
    if quantization == "bf16":
        return {"dtype": torch.bfloat16}
    if quantization in ("nf4", "int8"):
        if method:
            raise LoadError(f"the checkpoint is already quantized ({method}); serve it with --quantization none")
        try:
            import_bitsandbytes()
        except Exception as exc:
            raise LoadError(f"--quantization {quantization} needs bitsandbytes ({exc})") from None
        from transformers import BitsAndBytesConfig

        if quantization == "nf4":
            compute = _bnb_compute_dtype(device_type)
            qc = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                    bnb_4bit_compute_dtype=compute, bnb_4bit_use_double_quant=True)
            return {"quantization_config": qc, "dtype": compute}
        return {"quantization_config": BitsAndBytesConfig(load_in_8bit=True),
                "dtype": torch.float16 if device_type == "cuda" else torch.bfloat16}
    if quantization == "int4":
        if method:
            raise LoadError(f"the checkpoint is already quantized ({method}); serve it with --quantization none")
        from model_server.int4 import choose_compute

        cap = torch.cuda.get_device_capability() if device_type == "cuda" else None
        return {"dtype": choose_compute(device_type, cap).dtype}
    if quantization == "gptq":
        if method != "gptq":
            raise LoadError("--quantization gptq needs a pre-quantized GPTQ checkpoint "
                            "(config.json quantization_config.quant_method == 'gptq')")
        return {"dtype": torch.float16 if device_type == "cuda" else torch.float32}
    raise LoadError(f"unknown quantization {quantization!r}")
