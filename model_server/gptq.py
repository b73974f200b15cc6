"""GPTQ checkpoints at load: make gptqmodel + optimum importable, and settle their kernels' weight layout.

Owns those two steps (:mod:`model_server.loading` calls them for a GPTQ checkpoint); choosing the
quantization and loading are :mod:`model_server.loading`'s.
"""
from __future__ import annotations

import os


def prepare_gptq() -> None:
    """Make gptqmodel + optimum importable for a GPTQ checkpoint, or fail in one line.

    gptqmodel sizes a CPU worker pool at import; on 2-core machines it needs GPTQMODEL_CPU_WORKERS.
    """
    from model_server.loading import LoadError

    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", str(max(2, os.cpu_count() or 2)))
    missing = []
    for mod in ("gptqmodel", "optimum"):
        try:
            __import__(mod)
        except Exception:
            missing.append(mod)
    if missing:
        raise LoadError(f"GPTQ checkpoints need {' and '.join(missing)} "
                        "(pip install 'edge-eval[gptq]'; auto-gptq does not work with transformers 5)")


def settle_gptq_kernels(model, tokenizer) -> None:
    """Run one token through the model so GPTQ kernels repack their weights now, not on the first request.

    gptqmodel's CPU kernel (TorchAtenLinear) converts qweight to the int4pack layout and builds
    ``scales_and_zeros`` on its first forward; doing it at load makes load time honest and lets
    ``model_server.weights.measure_weight_bytes`` see the layout the server actually holds.
    """
    import torch

    ids = tokenizer("a", add_special_tokens=True)["input_ids"][:1] or [0]
    with torch.no_grad():
        model(input_ids=torch.tensor([ids], device=model.device))
