"""The energy package's public API: what code outside ``edge_proxy.energy`` may import.

Owns only the list of public names (``__all__``); every name is defined in its own module here:

* :class:`Sampler` (``sampler``): the background thread that polls a reader into bounded rings;
* :class:`NvmlReader` (``nvml_source``): the GPU energy counter through NVML;
* :class:`EnergyReader`, :class:`Reading`, :class:`Tick`, :class:`ReaderError` (``readings``): the
  reader protocol and the reading / tick types a sampler hands out.

``model_server`` (its ``GET /energy`` route) imports only these names, never the modules behind
them. This module must not define behaviour of its own, nor import anything heavier than those
modules (they need the standard library only; NVML loads on a reader's construction).
"""
from edge_proxy.energy.nvml_source import NvmlReader
from edge_proxy.energy.readings import EnergyReader, Reading, ReaderError, Tick
from edge_proxy.energy.sampler import Sampler

__all__ = ["EnergyReader", "NvmlReader", "Reading", "ReaderError", "Sampler", "Tick"]
