"""Logs a user reads: the model server's are one line format with no third-party start-up noise
and no progress-bar carriage returns; a backend the proxy spawns writes prefixed lines (or its own
file), never unmarked lines among the JSON access log."""
from __future__ import annotations

import asyncio
import re
import sys
from pathlib import Path

import aiohttp
import pytest

from edge_proxy.coldstart.supervisor import BackendSupervisor

LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+: ")
# a backend that prints like model-server's dependencies do: a progress bar with \r, stderr lines
NOISY = ("import sys, time\n"
         "sys.stderr.write('Loading weights:   0%|  | 0/2\\rLoading weights: 100%|##| 2/2\\n'); sys.stderr.flush()\n"
         "print('ready on {port}', flush=True)\n"
         "time.sleep(30)\n")


def test_model_server_log_is_one_format(model_server):
    async def one():
        async with aiohttp.ClientSession() as s:
            async with s.post(model_server.url + "/generate",
                              json={"inputs": "hi", "parameters": {"max_new_tokens": 3}}) as r:
                assert r.status == 200
    asyncio.run(one())
    text = model_server.log()
    assert "\r" not in text
    lines = [x for x in text.splitlines() if x.strip()]
    assert any("ready:" in x for x in lines)
    bad = [x for x in lines if not LINE.match(x)]
    assert not bad, bad
    assert not [x for x in lines if " INFO ContinuousBatchingLogger" in x or " INFO transformers" in x]


@pytest.mark.asyncio
async def test_spawned_backend_output_is_prefixed(capsys):
    sup = BackendSupervisor(f"{sys.executable} -c \"{NOISY}\"", host="127.0.0.1", port=7)
    await sup.start()
    pid = sup.pid
    seen = ""
    for _ in range(200):
        seen += capsys.readouterr().err
        if "ready on 7" in seen:
            break
        await asyncio.sleep(0.05)
    await sup.close()
    seen += capsys.readouterr().err
    lines = [x for x in seen.splitlines() if x.strip()]
    assert "\r" not in seen
    assert lines == [f"[backend {pid}] Loading weights:   0%|  | 0/2",
                     f"[backend {pid}] Loading weights: 100%|##| 2/2",
                     f"[backend {pid}] ready on 7"], lines


@pytest.mark.asyncio
async def test_spawned_backend_output_to_its_own_file(tmp_path: Path, capsys):
    log = tmp_path / "backend.log"
    sup = BackendSupervisor(f"{sys.executable} -c \"{NOISY}\"", host="127.0.0.1", port=9, output=str(log))
    await sup.start()
    for _ in range(200):
        if log.is_file() and "ready on 9" in log.read_text():
            break
        await asyncio.sleep(0.05)
    await sup.close()
    assert "ready on 9" in log.read_text()
    assert "ready on 9" not in capsys.readouterr().err
