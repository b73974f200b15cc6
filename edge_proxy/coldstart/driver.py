"""The cold-start driver: one task per cold start that starts the backend (``--spawn``), polls
its readiness until ready, failed or past ``max_wait_seconds``, and then releases (or rejects) the
held requests.

Owns: the order of one cold start's steps and its failure outcomes (``spawn_failed``,
``hold_timeout``, ``error``). Must not: admit requests (:mod:`.hold`), fill record fields itself
(:mod:`.recording`), or keep state between cold starts (the gate does).
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from edge_proxy.coldstart.record import ColdStart
from edge_proxy.coldstart.spawn import SpawnError

if TYPE_CHECKING:
    from edge_proxy.coldstart.gate import ColdStartGate

log = logging.getLogger("edge_proxy.coldstart")


async def drive(gate: ColdStartGate, reason: str, hold_start_ns: int | None) -> None:
    """Run one cold start to its end (see the module docstring). Never leaves requests held."""
    cs: ColdStart | None = None
    s, rec = gate.s, gate.recorder
    try:
        sup = gate.supervisor
        if sup is not None and (not sup.running or sup.stopping):
            # (a backend still draining after an idle stop: start() waits for the stop to end)
            cs = gate.begin(reason, hold_start_ns)
            try:
                t = await sup.start()
            except SpawnError as exc:
                gate.m.process_exits.labels(outcome="start_failed").inc()
                gate.fail(cs, "error", "spawn_failed", f"backend could not be started: {exc}")
                return
            cs.timeline.set("process_start", t, "proxy")
            gate.m.process_up.set(1)
        deadline = (cs.timeline.hold_start if cs else time.monotonic_ns()) + int(s.max_wait_seconds * 1e9)
        while True:
            pr = await gate.probe.check()
            if cs is not None:
                rec.note_probe(cs, pr)
            if pr.ready and (sup is None or sup.running):   # not our child's answer if it exited
                break
            if cs is None:
                cs = gate.begin(reason, hold_start_ns)
                rec.note_probe(cs, pr)
                deadline = cs.timeline.hold_start + int(s.max_wait_seconds * 1e9)
            if sup is not None and not sup.running:
                sup.record_failure()
                gate.m.process_exits.labels(outcome="start_failed").inc()
                gate.fail(cs, "error", "spawn_failed",
                          f"the backend process exited with code {sup.last_returncode} before it was ready")
                return
            if time.monotonic_ns() >= deadline:
                gate.fail(cs, "timeout", "hold_timeout",
                          f"the backend did not become ready within {s.max_wait_seconds:g} s (max wait); retry later")
                if sup is not None and sup.running:
                    await sup.stop(grace_seconds=min(s.stop_grace_seconds, 5.0))
                    gate.m.process_exits.labels(outcome="start_failed").inc()
                    gate.m.process_up.set(0)
                return
            await asyncio.sleep(s.readiness_poll_seconds)
        if cs is not None:
            rec.mark_ready(cs, pr.t_ns)
        if sup is not None:
            sup.record_success()
        await gate.hold.release_all(cs)
        if cs is not None and cs.released == 0:
            # Nothing was waiting (a restart after a crash, or every client gave up): there is no
            # first request, so the cold start ends at ready.
            gate.spawn_bg(rec.finalize(cs))
        gate.ready = True
    except asyncio.CancelledError:
        if cs is not None and cs.outcome is None:
            rec.mark_failed(cs, "error", "cancelled (proxy shutting down)")
        raise
    except Exception as exc:   # never leave held requests hanging on a bug
        log.exception("cold start: driver failed")
        if cs is None:
            cs = gate.begin(reason, hold_start_ns)
        gate.fail(cs, "error", "spawn_failed", f"cold start failed: {exc}")
