"""GET /energy for split deployments (placeholder: the energy issue replaces this module)."""
from __future__ import annotations

from aiohttp import web


def register_energy_routes(app: web.Application, gpu_uuids: list[str] | None = None) -> None:
    """Add ``GET /energy`` to the model server's app."""

    async def energy(_request: web.Request) -> web.Response:
        return web.json_response({"error": "energy endpoint not implemented yet"}, status=501)

    app.router.add_get("/energy", energy)
