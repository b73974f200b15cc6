"""Calling the model's modules from the engine's steps without ``nn.Module.__call__``.

While torch.fx traces, its tracer replaces ``nn.Module.__call__`` on the class, so for every thread;
inductor runs such a trace while it compiles (the background warm-up's thread), and a step that reached
a module through ``__call__`` meanwhile went into the tracer and failed (``NameError: module is not
installed as a submodule``; an H100 cold start, 2026-12-05, lost 16 requests to it). The engine's
modules carry no hooks, so their ``forward`` is all that ``__call__`` would run; a module with hooks
(its own or global ones) still goes through ``__call__``, hooks and all.

Owns that one call; the runner, prefill, mixed steps and merged projections use it.
"""
from __future__ import annotations

from typing import Any

from torch import nn
from torch.nn.modules import module as _module

_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks")
_OWN_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def hooked(mod: nn.Module) -> bool:
    """Whether calling ``mod`` would run a hook (its own or a global one)."""
    return (any(getattr(mod, h, None) for h in _OWN_HOOKS)
            or any(getattr(_module, h, None) for h in _GLOBAL_HOOKS))


def run(mod: nn.Module, *args: Any) -> Any:
    """``mod(*args)``, through ``mod.forward`` unless a hook is registered (see the module docstring)."""
    if hooked(mod):
        return mod(*args)
    return mod.forward(*args)
