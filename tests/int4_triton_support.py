"""Shared by the INT4 Triton kernel tests: Triton's CPU interpreter for every test of a module that imports
:func:`interpreter`, and the float64 reference product they compare with."""
from __future__ import annotations

import pytest
import torch

from model_server import int4_triton
from model_server.int4_quant import dequantize_groupwise


@pytest.fixture(autouse=True)
def interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert int4_triton.available()


def reference(x: torch.Tensor, q: torch.Tensor, sz: torch.Tensor, group: int) -> torch.Tensor:
    """``x @ dequant(q)^T`` in float64."""
    return x.double() @ dequantize_groupwise(q, sz, group).double().t()


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    """Relative Frobenius error of ``got`` against ``want``."""
    return float((got.double() - want).norm() / want.norm())


def set_switch(monkeypatch, name: str, value: str, cached) -> None:
    """Set the switch ``name`` to ``value`` for this test and clear ``cached``, the function that reads it once."""
    monkeypatch.setenv(name, value)
    cached.cache_clear()


def fresh_switch(cached):
    """An autouse fixture (assign it to a name in the test module) that clears ``cached`` around each test."""
    @pytest.fixture(autouse=True)
    def _fresh():
        cached.cache_clear()
        yield
        cached.cache_clear()
    return _fresh
