"""The supervisor's exit code of a backend that exited, read before its exit watcher has run.

``BackendSupervisor.running`` turns False as soon as the child is reaped, a moment before the exit watcher task
records the code; the cold-start driver reads ``last_returncode`` in between to say why a start failed (the CI run
of 6a951aa reported "exited with code None"). Here the watcher is cancelled, so it never runs: the code must come
from the process itself.
"""
from __future__ import annotations

import asyncio
import sys

import pytest

from edge_proxy.coldstart.supervisor import BackendSupervisor


@pytest.mark.asyncio
async def test_the_exit_code_is_known_once_running_is_false_without_the_watcher() -> None:
    sup = BackendSupervisor(f"{sys.executable} -c 'import sys; sys.exit(3)'", host="127.0.0.1", port=7)
    assert sup.last_returncode is None
    await sup.start()
    sup._watch.cancel()                                  # the watcher has not recorded anything, and never will
    for _ in range(400):
        if not sup.running:
            break
        await asyncio.sleep(0.01)
    assert not sup.running and sup.last_returncode == 3
    await sup.close()
    assert sup.last_returncode == 3
