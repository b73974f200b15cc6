"""The fast engine: our own batched decode loop over a preallocated KV cache with CUDA graphs.

See :mod:`model_server.engines.fast.engine` for the constructor the server calls.
"""
from .engine import FastEngine
from .factory import from_loaded
from .support import SUPPORTED_ARCHITECTURES, UnsupportedModel, check_supported

__all__ = ["FastEngine", "from_loaded", "UnsupportedModel", "SUPPORTED_ARCHITECTURES", "check_supported"]
