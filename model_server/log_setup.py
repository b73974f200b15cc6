"""Logging of the model server: one line format for every logger, no third-party start-up noise,
no progress bars in files.

- Our lines and every library's go through the root logger's one handler
  (``2026-12-03 10:00:00,000 INFO model_server: ...``).
- transformers' continuous-batching logger (its own handler and format, INFO lines at every
  manager start) and transformers' library logger are brought onto that handler at WARNING.
- bitsandbytes' CPU back end warns on CPUs with AVX512-BF16 that it could not fetch an optimised
  NF4 kernel through the ``kernels`` package (a download from the Hugging Face hub at run time,
  which we do not install); it then uses its built-in CPU kernel. That warning is silenced
  (docs/model_server.md, "Logs").
- Progress bars (weight loading) are off when stderr is not a terminal, so log files have no
  carriage-return lines.
"""
from __future__ import annotations

import logging
import os
import sys
from typing import TextIO

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
QUIET_LOGGERS = {
    "ContinuousBatchingLogger": logging.WARNING,
    "bitsandbytes.backends.cpu.ops": logging.ERROR,
    "transformers": logging.WARNING,
    "accelerate": logging.WARNING,
    "huggingface_hub": logging.WARNING,
}


def setup_logging(level: str = "info", stream: TextIO | None = None) -> None:
    """Configure logging for ``model-server serve``; call before torch/transformers are imported."""
    stream = stream or sys.stderr
    if not stream.isatty():
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")   # read when huggingface_hub loads
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "warning")
    logging.basicConfig(level=getattr(logging, level.upper()), stream=stream, format=FORMAT)
    for name, lvl in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(max(lvl, logging.getLogger().level))
    # transformers adds its own handler to this logger only while it still propagates: it does
    # not, and the root handler is attached directly (one format)
    cb = logging.getLogger("ContinuousBatchingLogger")
    cb.propagate = False
    if not cb.handlers:
        cb.handlers = list(logging.getLogger().handlers)


def adopt_transformers_logging() -> None:
    """After ``import transformers``: its library logger propagates to our handler instead of
    printing ``[transformers] ...`` lines through its own."""
    from transformers.utils import logging as tlog

    tlog.disable_default_handler()
    tlog.enable_propagation()
    logging.getLogger("transformers").setLevel(max(logging.WARNING, logging.getLogger().level))
