"""Graceful stop of ``edge-proxy serve`` on SIGTERM/SIGINT: drain, cut what is left cleanly, exit.

1. The client-facing port stops listening; idle keep-alive connections close (aiohttp's
   ``pre_shutdown``). ``/metrics`` (its own port) keeps answering until the process exits, so the
   drain itself can be scraped.
2. Requests in flight get up to ``proxy.drain_timeout_seconds`` (``--drain-timeout``, default 30 s)
   to finish. Requests held by the cold-start gate are not waited for: the gate answers them
   itself when it closes (step 4), and a ``--spawn`` backend is stopped then anyway.
3. Generation requests still running then are ended in their API's format: a stream whose headers
   went out gets one SSE error event (``error.code``/``error_type`` ``shutdown``, the same shape as
   the proxy's other stream errors) and a clean end of the chunked body; a request with nothing sent
   yet (waiting for the backend, or held) gets a 503 ``shutdown``. Their records end with outcome
   ``error``, error type ``shutdown``. Other connections (pass-through) get
   :data:`CLEANUP_TIMEOUT_SECONDS` more, then aiohttp closes them.
4. Cleanup (energy, economics, cold start), final metrics, then the ``/metrics`` port closes.

Before this, the metrics port closed first, and aiohttp's own bound (60 s + 60 s, not configurable)
cut streams without any event.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from edge_proxy.proxy.errors import error_body, error_event

if TYPE_CHECKING:
    from edge_proxy.proxy.runtime import ProxyRuntime

log = logging.getLogger("edge_proxy")

ERROR_TYPE = "shutdown"
CLEANUP_TIMEOUT_SECONDS = 2.0       # after the drain: what aiohttp gives connections still open


def _cut(rec: Any, request: Any, drain_s: float) -> str:
    """End one live generation request now; returns how ("event" | "503" | "closed")."""
    rec.outcome, rec.error_type = "error", ERROR_TYPE
    api = rec.api if rec.api in ("openai", "tgi") else "other"
    msg = f"the proxy is shutting down: request cut after the {drain_s:g} s drain"
    tr = request.transport
    writer = request.writer
    how = "closed"
    if tr is not None and not tr.is_closing():
        if writer is not None and writer.output_size > 0:
            if rec.stream:
                data = error_event(api, ERROR_TYPE, msg)
                tr.write(b"%x\r\n%b\r\n0\r\n\r\n" % (len(data), data) if writer.chunked else data)
                how = "event"
        else:
            body = error_body(api, ERROR_TYPE, msg, 503)
            rec.status = 503
            tr.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\nConnection: close\r\nx-edge-request-id: %b\r\n\r\n%b"
                     % (len(body), rec.request_id.encode("ascii", "replace"), body))
            how = "503"
        if how != "closed":
            tr.close()      # flushes what was written; a backend chunk arriving meanwhile is not sent after it
    task = request.task
    if task is not None and not task.done():
        task.cancel()       # the handler stops here; aiohttp then closes the connection (flushing)
    return how


def _held_ids(runtime: "ProxyRuntime") -> set[int]:
    """ids of the records the cold-start gate holds now (its waiters), if there is a gate."""
    held = getattr(runtime.gate, "held_records", None)
    return {id(rec) for rec in held()} if held is not None else set()


async def graceful_stop(runtime: "ProxyRuntime", drain_s: float) -> dict[str, int]:
    """Drain and stop ``runtime`` (steps 1-4 above). Returns how many requests were cut, by how:
    ``event`` (SSE error event), ``503``, ``closed`` (the client had gone)."""
    main = runtime._runners[0] if runtime._runners else None      # noqa: SLF001 - owned by ProxyRuntime
    counts = {"event": 0, "503": 0, "closed": 0}
    if main is None:
        await runtime.stop()
        return counts
    for site in list(main.sites):
        await site.stop()                         # no new connections; /metrics stays up
    server = main.server
    if server is not None:
        server.pre_shutdown()                     # idle keep-alive connections close now
    live = runtime.core.live
    gate_drain = getattr(runtime.gate, "shutdown", None)
    gate_task = asyncio.create_task(gate_drain(), name="gate-drain") if gate_drain is not None else None
    # ^ held requests: released within coldstart.drain_seconds if a cold start is under way, else
    #   handed back with 503 draining + Retry-After (the gate's own drain), alongside this one

    def busy() -> tuple[list[tuple[Any, Any]], list[Any]]:
        """(live generation requests not held by the gate, connections other than held ones)"""
        held = _held_ids(runtime)
        reqs = [v for k, v in live.items() if k not in held]
        held_conns = {id(req.protocol) for k, (_, req) in live.items() if k in held}
        conns = [c for c in (server.connections if server is not None else [])
                 if id(c) not in held_conns and getattr(c, "_request_in_progress", True)]   # idle keep-alive: nothing to wait for
        return reqs, conns

    reqs, _ = busy()
    log.info("stopping: draining %d generation request(s), at most %g s", len(reqs), drain_s)
    deadline = time.monotonic() + drain_s
    while time.monotonic() < deadline and any(busy()):
        await asyncio.sleep(0.05)
    for rec, request in busy()[0]:
        counts[_cut(rec, request, drain_s)] += 1
    if any(counts.values()):
        log.warning("drain bound of %g s reached: cut %d stream(s) with an error event, answered %d "
                    "request(s) 503, closed %d", drain_s, counts["event"], counts["503"], counts["closed"])
        await asyncio.sleep(0)                    # let the cancelled handlers unwind
    if gate_task is not None:
        await asyncio.gather(gate_task, return_exceptions=True)
    await runtime.stop()                          # main port's cleanup first, /metrics last
    return counts
