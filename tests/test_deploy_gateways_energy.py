"""Several gateways, one attribution per request (issue 20; the scale-to-zero overlay's topology),
with real processes on 127.0.0.1:

    openai clients -> gateway A (--hold, energy none) -\\
                   -> gateway B (--hold, energy none) --> sidecar proxy (replay of the recorded H200
                                                          trace, --watch-startup) -> tiny model server

Warm: requests through both gateways; across the three proxies' /metrics every joule (GPU
counter, attributed, economics) is the sidecar's, once; each request appears once with energy in
the sidecar's access log and once without energy in its gateway's. Cold (slow: starts its own
server): the sidecar starts before the model server, as in the pod; requests through both gateways
are held, released when it is ready; the start-up is one cold start with energy, at the sidecar.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import start_model_server
from tests.net_support import free_port, wait_http_ok

TRACE = Path(__file__).parent / "data" / "energy_h200_recorded.jsonl"   # 93 s, recorded on an H200

ENERGY_FAMILIES = ("edge_proxy_gpu_energy_joules", "edge_proxy_attributed_energy_joules",
                   "edge_proxy_attributed_full_energy_joules", "edge_proxy_idle_energy_joules",
                   "edge_proxy_energy_source_info", "edge_proxy_request_energy_joules")


@contextlib.contextmanager
def proxy(tmp: Path, name: str, *args: str) -> Iterator[tuple[str, str, Path]]:
    """``edge-proxy serve`` as a subprocess on free ports; yields (url, metrics_url, access_log)."""
    port, mport = free_port(), free_port()
    log = tmp / f"{name}.access.jsonl"
    err = open(tmp / f"{name}.stderr", "w")
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_PROXY_")}
    proc = subprocess.Popen([sys.executable, "-m", "edge_proxy", "serve", "--host", "127.0.0.1",
                             "--port", str(port), "--metrics-port", str(mport), "--access-log", str(log),
                             *args], stdout=err, stderr=err, env=env)
    try:
        wait_http_ok(f"http://127.0.0.1:{mport}/healthz", timeout=30, proc=proc)
        yield f"http://127.0.0.1:{port}", f"http://127.0.0.1:{mport}", log
    except BaseException:
        err.flush()     # a failure shows what this proxy said (pytest prints captured output)
        print(f"--- {name} stderr (tail) ---\n" + (tmp / f"{name}.stderr").read_text(errors="replace")[-3000:])
        raise
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        err.close()


def scrape(metrics_url: str) -> dict[str, list]:
    with urllib.request.urlopen(metrics_url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    return {f.name: [s for s in f.samples if not s.name.endswith("_created")]
            for f in text_string_to_metric_families(text)}


def total(fams: dict[str, list], name: str) -> float:
    return sum(s.value for s in fams.get(name, []) if s.name in (name, name + "_total"))


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def log_lines(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


@contextlib.contextmanager
def three_proxies(tmp: Path, backend: str) -> Iterator[dict[str, tuple[str, str, Path]]]:
    """The overlay's chain: the attributing sidecar (replayed H200 trace, --watch-startup) in front
    of ``backend``, two gateways (--hold, energy none) in front of the sidecar."""
    with proxy(tmp, "sidecar", "--backend", backend, "--energy-source", "replay",
               "--energy-replay", str(TRACE), "--energy-period", "0.1", "--watch-startup") as side:
        gw = ("--backend", side[0], "--energy-source", "none", "--hold", "--max-wait", "120")
        with proxy(tmp, "gw-a", *gw) as a, proxy(tmp, "gw-b", *gw) as b:
            yield {"sidecar": side, "a": a, "b": b}


async def ask(url: str, rid: str, stream: bool, model: str = "tiny") -> int:
    """One chat completion through ``url`` with x-request-id ``rid``; returns the output tokens."""
    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)
    try:
        kw = dict(model=model, max_tokens=5, extra_body={"ignore_eos": True},
                  extra_headers={"x-request-id": rid},
                  messages=[{"role": "user", "content": f"hello {rid}"}])
        if stream:
            s = await client.chat.completions.create(stream=True, **kw)
            return sum([sum(1 for c in ch.choices if c.delta.content) async for ch in s])
        out = await client.chat.completions.create(**kw)
        assert out.usage is not None
        return out.usage.completion_tokens
    finally:
        await client.close()


def settle(procs: dict[str, tuple[str, str, Path]], n: int, cold_starts: int = 0) -> tuple[dict, dict]:
    """Wait until the sidecar logged ``n`` requests (energy final a tick after each ends) and has
    ``cold_starts`` finalized cold starts (energy window closed: economics counts a cold start only
    then); return every proxy's parsed /metrics and /edge/cold-starts."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and len(log_lines(procs["sidecar"][2])) < n:
        time.sleep(0.2)
    while time.monotonic() < deadline and cold_starts:
        snap = get_json(procs["sidecar"][1] + "/edge/cold-starts")
        if snap["current"] is None and len(snap["cold_starts"]) >= cold_starts:
            break
        time.sleep(0.2)
    time.sleep(0.5)
    fams = {name: scrape(p[1]) for name, p in procs.items()}
    snaps = {name: get_json(p[1] + "/edge/cold-starts") for name, p in procs.items()}
    return fams, snaps


def check_once(procs: dict[str, tuple[str, str, Path]], fams: dict, ids: set[str]) -> list[dict]:
    """Each request once with energy (sidecar) and once without (its gateway); every joule the
    sidecar's. Returns the sidecar's records."""
    side = [r for r in log_lines(procs["sidecar"][2]) if r["route"] == "/v1/chat/completions"]
    assert sorted(r["client_request_id"] for r in side) == sorted(ids), "every request once at the sidecar"
    for r in side:
        assert r["outcome"] == "ok" and r["energy"]["source"] == "replay" and r["energy"]["full_joules"] > 0, r
    for tag in ("a", "b"):
        gw = [r for r in log_lines(procs[tag][2]) if r["route"] == "/v1/chat/completions"]
        assert sorted(r["client_request_id"] for r in gw) == sorted(i for i in ids if i.startswith(tag))
        assert all("energy" not in r for r in gw), "a gateway attributed energy"
    for name in ENERGY_FAMILIES:
        assert name not in fams["a"] and name not in fams["b"], f"a gateway exports {name}"
    for name in ("edge_proxy_gpu_energy_joules", "edge_proxy_attributed_full_energy_joules",
                 "edge_proxy_economics_energy_joules", "edge_proxy_energy_cost_usd"):
        per = {p: total(f, name) for p, f in fams.items()}
        assert per["sidecar"] > 0, (name, per)
        assert sum(per.values()) == pytest.approx(per["sidecar"], rel=1e-9), (name, per)
    # the requests' energy in the log is what economics counted, once
    assert sum(r["energy"]["full_joules"] for r in side) == \
        pytest.approx(total(fams["sidecar"], "edge_proxy_economics_energy_joules"), rel=1e-6)
    assert total(fams["sidecar"], "edge_proxy_economics_requests") == len(ids)
    return side


def test_two_gateways_one_sidecar_each_request_and_each_joule_once(model_server, tmp_path: Path) -> None:
    """Warm: 12 requests (streamed and not) through both gateways at once."""
    with three_proxies(tmp_path, model_server.url) as procs:
        model = json.loads(urllib.request.urlopen(model_server.url + "/v1/models", timeout=10).read())["data"][0]["id"]

        async def traffic() -> list[int]:
            return await asyncio.gather(*(ask(procs[t][0], f"{t}-{i}", i % 2 == 0, model)
                                          for t in ("a", "b") for i in range(6)))

        counts = asyncio.run(traffic())
        assert len(counts) == 12 and all(c > 0 for c in counts), counts
        fams, snaps = settle(procs, 12)
    check_once(procs, fams, {f"{t}-{i}" for t in "ab" for i in range(6)})
    # The server was up before the sidecar started: no cold start anywhere.
    assert all(not s["cold_starts"] and s["current"] is None for s in snaps.values()), snaps


@pytest.mark.slow
def test_a_cold_start_behind_two_gateways_is_metered_once_at_the_sidecar(tiny_model_dir: str, tmp_path: Path) -> None:
    """The scale-from-zero case: the sidecar starts before the model server (as in the pod),
    requests through both gateways are held, the server starts; its start-up is one cold start with
    energy, at the sidecar; the gateways record the wait their clients saw, without energy."""
    server_port = free_port()
    with three_proxies(tmp_path, f"http://127.0.0.1:{server_port}") as procs:
        s_metrics = procs["sidecar"][1]
        deadline = time.monotonic() + 10          # the sidecar's first probe finds no server: a cold start
        while time.monotonic() < deadline and get_json(s_metrics + "/edge/cold-starts")["current"] is None:
            time.sleep(0.1)
        cur = get_json(s_metrics + "/edge/cold-starts")["current"]
        assert cur is not None and cur["reason"] == "startup", "the sidecar does not record the server's start-up"

        async def traffic() -> list[int]:
            held = [asyncio.create_task(ask(procs[t][0], f"{t}-cold-{i}", i % 2 == 0))
                    for t in ("a", "b") for i in range(3)]
            deadline = time.monotonic() + 30
            pend: list[int] = []
            while time.monotonic() < deadline:
                pend = [get_json(procs[t][1] + "/edge/pending")["pending_requests"] for t in ("a", "b")]
                if pend == [3, 3]:
                    break
                await asyncio.sleep(0.1)
            assert pend == [3, 3], pend
            with start_model_server(tiny_model_dir, "--port", str(server_port), "--max-batch", "8",
                                    "--model-name", "tiny", wait_ready=False) as server:
                counts = await asyncio.gather(*held)
                assert server.proc.poll() is None
            return counts

        counts = asyncio.run(traffic())
        assert len(counts) == 6 and all(c > 0 for c in counts), counts
        fams, snaps = settle(procs, 6, cold_starts=1)
    check_once(procs, fams, {f"{t}-cold-{i}" for t in "ab" for i in range(3)})
    (cs,) = snaps["sidecar"]["cold_starts"]
    assert cs["reason"] == "startup" and cs["outcome"] == "ready"
    assert cs["energy_source"] == "replay" and cs["energy_joules"] > 0
    per = {p: total(f, "edge_proxy_economics_cold_start_energy_joules") for p, f in fams.items()}
    assert per["sidecar"] == pytest.approx(cs["energy_joules"]) and sum(per.values()) == pytest.approx(per["sidecar"]), per
    for g in ("a", "b"):
        (gcs,) = snaps[g]["cold_starts"]            # the gateways saw it too (hold, wait, first token) ...
        assert gcs["outcome"] == "ready" and gcs["released_requests"] == 3
        assert gcs["energy_joules"] is None and gcs["load_energy_joules"] is None   # ... without energy
        gw = [r for r in log_lines(procs[g][2]) if r["route"] == "/v1/chat/completions"]
        assert all(r["cold_start"] for r in gw) and len(gw) == 3
