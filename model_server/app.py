"""The model server's aiohttp application: its routes, its body-size limit, and the never-500 middleware.

Owns the URL table (``/health``, ``/info``, ``/metrics``, ``/energy`` is added by
:mod:`model_server.energy_route`, TGI's and OpenAI's routes) and the error shape of a request that
fails outside the API handlers. It must not parse request bodies (the API modules do), load models
or manage the process (:mod:`model_server.server` does).
"""
from __future__ import annotations

import asyncio
import logging

from aiohttp import web
from prometheus_client.exposition import choose_encoder

from model_server import api_openai, api_tgi
from model_server.runtime import Runtime

log = logging.getLogger("model_server")

MAX_BODY_BYTES = 16 * 1024 * 1024       # a larger request body is answered 413 (docs/model_server.md)


def build_app(runtime: Runtime) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY_BYTES)
    app["runtime"] = runtime

    async def health(_r: web.Request) -> web.Response:
        if runtime.state == "ready":
            return web.json_response({"status": "ok", "state": runtime.state})
        return web.json_response({"status": "unavailable", "state": runtime.state}, status=503)

    async def info(_r: web.Request) -> web.Response:
        return web.json_response(runtime.info())

    async def metrics(r: web.Request) -> web.Response:
        refresh = getattr(runtime.engine, "refresh_stats", None)    # an API worker's engine is remote
        if refresh is not None:
            await refresh()
        # the format the scraper asks for (OpenMetrics for Prometheus), else the classic text format
        encoder, content_type = choose_encoder(r.headers.get("Accept", ""))
        return web.Response(body=encoder(runtime.metrics.registry), headers={"Content-Type": content_type})

    async def tgi_generate(r: web.Request) -> web.StreamResponse:
        return await api_tgi.handle(r, runtime, "generate")

    async def tgi_stream(r: web.Request) -> web.StreamResponse:
        return await api_tgi.handle(r, runtime, "stream")

    async def tgi_root(r: web.Request) -> web.StreamResponse:
        return await api_tgi.handle(r, runtime, "root")

    async def completions(r: web.Request) -> web.StreamResponse:
        return await api_openai.handle(r, runtime, chat=False)

    async def chat(r: web.Request) -> web.StreamResponse:
        return await api_openai.handle(r, runtime, chat=True)

    async def models(r: web.Request) -> web.Response:
        return await api_openai.models(r, runtime)

    async def model(r: web.Request) -> web.Response:
        return await api_openai.model(r, runtime)

    @web.middleware
    async def never_500(request: web.Request, handler) -> web.StreamResponse:
        """Unexpected exceptions become a JSON error in the route's API format, never a traceback page."""
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status == 405 or exc.status == 404:
                msg = f"{request.method} {request.path}: {exc.reason}"
                if request.path.startswith("/v1/"):
                    return web.json_response({"error": {"message": msg, "type": "invalid_request_error",
                                                        "param": None, "code": None}}, status=exc.status)
                return web.json_response({"error": msg, "error_type": "validation"}, status=exc.status)
            raise
        except asyncio.CancelledError:
            raise
        except ConnectionResetError as exc:     # the client went away mid-write: not an error
            log.debug("client went away during %s %s: %s", request.method, request.path, exc)
            # never sent (the transport is closing); aiohttp's write of it ends quietly
            return web.Response(status=499, reason="Client Closed Request")
        except Exception as exc:  # a bug: log it, answer in the API's format
            log.exception("internal error on %s %s", request.method, request.path)
            msg = f"internal error: {type(exc).__name__}"
            if request.path.startswith("/v1/"):
                return web.json_response({"error": {"message": msg, "type": "server_error", "param": None,
                                                    "code": None}}, status=500)
            return web.json_response({"error": msg, "error_type": "generation"}, status=500)

    app.middlewares.append(never_500)
    app.router.add_get("/health", health)
    app.router.add_get("/info", info)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/generate", tgi_generate)
    app.router.add_post("/generate_stream", tgi_stream)
    app.router.add_post("/", tgi_root)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/v1/models/{model_id:.+}", model)
    return app
