"""edge-eval model server: a small transformers model server (TGI + OpenAI APIs) and ``synth``."""

__version__ = "0.1.0"
