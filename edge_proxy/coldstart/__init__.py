"""Cold start: hold requests while the backend is not ready, a local scale-to-zero supervisor, and
the phased cold-start tax. Entry points: :func:`create_coldstart`, :func:`install`."""
from edge_proxy.coldstart.factory import (
    COLD_START_HEADER,
    COLD_START_WAIT_HEADER,
    attach_coldstart,
    cold_start_headers,
    create_coldstart,
    install,
    validate,
)
from edge_proxy.coldstart.gate import ColdStartGate
from edge_proxy.coldstart.record import ColdStart

__all__ = [
    "COLD_START_HEADER", "COLD_START_WAIT_HEADER", "ColdStart", "attach_coldstart", "ColdStartGate", "cold_start_headers",
    "create_coldstart", "install", "validate",
]
