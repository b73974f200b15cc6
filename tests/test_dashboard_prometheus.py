"""The Grafana dashboard, tested for real: Debian's Prometheus (loading our recording rules,
scrape_interval 1 s) scrapes a running proxy and the model server it spawned (tiny synthetic
model, so the traffic includes a real cold start), some mixed traffic goes through the proxy,
and every panel's PromQL, template variables substituted, returns data without error.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from tests.net_support import free_port, stop_process as _stop, wait_http_ok

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS = shutil.which("prometheus") or ("/usr/bin/prometheus" if Path("/usr/bin/prometheus").exists() else None)
MODEL = "tiny"
FEEDBACK_TOKEN = "dash-token"
# Values substituted for the dashboard's template variables (as Grafana would).
TEMPLATE = {"$__rate_interval": "15s", "$__range": "5m", "${datasource}": "prometheus", "$model": ".*",
            "$cluster": ".*", "$namespace": ".*", "$pod": ".*"}

pytestmark = pytest.mark.skipif(PROMETHEUS is None, reason="prometheus not installed (apt-get install prometheus)")


def _post(url: str, body: dict[str, Any], headers: dict[str, str] | None = None,
          timeout: float = 120.0) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _prom_query(prom: str, expr: str) -> dict[str, Any]:
    url = f"{prom}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return json.loads(exc.read())


def _panels() -> list[dict[str, Any]]:
    dash = json.loads((ROOT / "grafana" / "dashboards" / "edge-eval.json").read_text())
    return [p for p in dash["panels"] if p.get("type") != "row"]


def _substitute(expr: str) -> str:
    for k, v in TEMPLATE.items():
        expr = expr.replace(k, v)
    assert "$" not in expr, f"unsubstituted template variable in {expr}"
    return expr


@pytest.fixture
def stack(tiny_model_dir: str, tmp_path: Path) -> Iterator[dict[str, str]]:
    backend_port, proxy_port, metrics_port, prom_port = (free_port() for _ in range(4))
    probes = tmp_path / "golden.jsonl"
    probes.write_text(json.dumps({"id": "any", "prompt": "Hello", "expected": ".", "checker": "regex",
                                  "max_tokens": 4}) + "\n")
    cfg = tmp_path / "proxy.yaml"
    cfg.write_text(yaml.safe_dump({
        "proxy": {"backend_url": f"http://127.0.0.1:{backend_port}", "port": proxy_port,
                  "metrics_port": metrics_port, "model_name": MODEL, "access_log": None},
        "energy": {"source": "estimated"},
        # Prices where self-hosting wins per request (tiny requests on a CPU): N_break is finite.
        "economics": {"gpu_usd_per_hour": 0.01, "setup_usd": 2.0,
                      "api_usd_per_million_input_tokens": 30.0, "api_usd_per_million_output_tokens": 60.0, "scores": {MODEL: 0.6},
                      "reference_scores": {MODEL: 0.62}, "feedback_token": FEEDBACK_TOKEN,
                      "probes_path": str(probes), "probe_interval_seconds": 1.0},
        "coldstart": {"spawn": f"{sys.executable} -m model_server serve {tiny_model_dir} "
                               "--host 127.0.0.1 --port {port} --device cpu --max-batch 8"},
    }))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    prom_dir = tmp_path / "prom"
    prom_dir.mkdir()
    (prom_dir / "prometheus.yml").write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ROOT / "grafana" / "rules" / "edge-eval.rules.yml")],
        "scrape_configs": [
            {"job_name": "edge-proxy", "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}]},
            {"job_name": "model-server", "static_configs": [{"targets": [f"127.0.0.1:{backend_port}"]}]},
        ],
    }))
    prom_log = open(tmp_path / "prometheus.log", "w")
    prom = subprocess.Popen([PROMETHEUS, f"--config.file={prom_dir / 'prometheus.yml'}",
                             f"--storage.tsdb.path={prom_dir / 'data'}",
                             f"--web.listen-address=127.0.0.1:{prom_port}"],
                            stdout=prom_log, stderr=subprocess.STDOUT)
    log = open(tmp_path / "proxy.log", "w")
    proxy = None
    try:
        # The proxy's probes wake the model server a second after it starts, and a tiny model's cold start
        # is over in a few seconds; Prometheus takes up new scrape targets only some seconds after it
        # starts (every 5 s). The counters' first sample must come before the cold start (increase()
        # does not count a series that appears at 1), so the proxy starts once Prometheus scrapes.
        wait_http_ok(f"http://127.0.0.1:{prom_port}/-/ready", timeout=30, proc=prom)
        _wait_scraping(f"http://127.0.0.1:{prom_port}", "edge-proxy", timeout=30)
        proxy = subprocess.Popen([sys.executable, "-m", "edge_proxy", "serve", "--config", str(cfg)],
                                 stdout=log, stderr=subprocess.STDOUT, env=env)
        wait_http_ok(f"http://127.0.0.1:{metrics_port}/metrics", timeout=30, proc=proxy)
        yield {"proxy": f"http://127.0.0.1:{proxy_port}", "prom": f"http://127.0.0.1:{prom_port}",
               "backend": f"http://127.0.0.1:{backend_port}", "log": str(tmp_path / "proxy.log")}
    finally:
        if proxy is not None:
            _stop(proxy)            # also stops the model server it spawned
        _stop(prom)
        log.close()
        prom_log.close()


def _wait_scraping(prom: str, job: str, timeout: float) -> None:
    """Until Prometheus has tried to scrape ``job``'s target at least once (its scrape loop runs)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"{prom}/api/v1/targets?state=active", timeout=10) as resp:
            targets = json.loads(resp.read())["data"]["activeTargets"]
        if any(t["labels"].get("job") == job and t.get("health") != "unknown" for t in targets):
            return
        time.sleep(0.2)
    pytest.fail(f"Prometheus never scraped the {job} target")


def _traffic(proxy: str) -> None:
    # The first request (or the proxy's first probe, a second after it started) finds no backend: the proxy
    # spawns the model server (a real cold start).
    status, body = _post(proxy + "/v1/completions", {"model": MODEL, "prompt": "Hello there",
                                                     "max_tokens": 4}, timeout=180)
    assert status == 200, body
    for i in range(6):
        # Streaming chat (TTFT / ITL histograms), non-streaming completions, TGI generate.
        status, body = _post(proxy + "/v1/chat/completions", {
            "model": MODEL, "messages": [{"role": "user", "content": f"Tell me {i}"}],
            "max_tokens": 6, "stream": True})
        assert status == 200, body
        status, body = _post(proxy + "/v1/completions", {"model": MODEL, "prompt": f"Count {i}",
                                                         "max_tokens": 5},
                             headers={"x-request-id": f"dash-{i}"})
        assert status == 200, body
        status, body = _post(proxy + "/generate", {"inputs": f"Say {i}",
                                                   "parameters": {"max_new_tokens": 4}})
        assert status == 200, body
    # feedback takes the proxy's id for a request (x-edge-request-id), not the client's
    req = urllib.request.Request(proxy + "/v1/completions", method="POST",
                                 data=json.dumps({"model": MODEL, "prompt": "Rate me",
                                                  "max_tokens": 3}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        rated = resp.headers["x-edge-request-id"]
    status, _ = _post(proxy + "/edge/feedback", {"request_id": rated, "score": 0.9},
                      headers={"Authorization": f"Bearer {FEEDBACK_TOKEN}"})
    assert status == 200


def test_every_panel_query_returns_data(stack: dict[str, str]) -> None:
    # Prometheus must have scraped the proxy before the traffic: a counter whose first sample
    # already holds all of the traffic has rate() 0 (flat), and the ratio rules would be NaN.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        up = _prom_query(stack["prom"], 'up{job="edge-proxy"}').get("data", {}).get("result", [])
        if up and up[0]["value"][1] == "1":
            break
        time.sleep(0.5)
    else:
        pytest.fail("Prometheus never scraped the proxy")
    _traffic(stack["proxy"])
    queries = [(p["title"], _substitute(t["expr"])) for p in _panels() for t in p["targets"]]
    # Panels on other exporters' series (kube-state-metrics, KEDA, dcgm-exporter: none runs here)
    # must still be valid PromQL; only they may come back empty.
    external = {p["title"] for p in _panels() if p.get("edgeEvalRequires")}
    assert len(external) <= 3, external
    assert len(queries) >= 25
    deadline = time.monotonic() + 45
    missing: list[str] = []
    while True:
        missing, errors = [], []
        for title, expr in queries:
            out = _prom_query(stack["prom"], expr)
            if out.get("status") != "success":
                errors.append(f"{title}: {expr}: {out.get('error')}")
            elif not out["data"]["result"] and title not in external:
                missing.append(f"{title}: {expr}")
        assert not errors, "queries failed:\n" + "\n".join(errors)
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(1.0)
    assert not missing, "panels without data:\n" + "\n".join(missing) + "\n" + Path(stack["log"]).read_text()[-3000:]

    # The five metrics carry real numbers (finite, positive), computed by the recording rules.
    # Economics counts a request when its energy is final (the tick after its end), so the counters
    # can still be at 0 a moment after the last response: poll until the rules see the requests.
    deadline = time.monotonic() + 30
    for expr in ("edge_eval:break_even_requests:ratio_rate5m", "edge_eval:intelligence_per_joule:ratio_rate5m",
                 "edge_eval:system_density_tokens_per_second_per_gigabyte:rate5m",
                 "edge_eval:cold_start_tax:ratio", "edge_eval:quantization_fidelity_percent:max"):
        while True:
            result = _prom_query(stack["prom"], f'{expr}{{model="{MODEL}"}}')["data"]["result"]
            value = float(result[0]["value"][1]) if result else math.nan
            if (math.isfinite(value) and value > 0) or time.monotonic() > deadline:
                break
            time.sleep(1.0)
        debug = {e: _prom_query(stack["prom"], e)["data"]["result"] for e in (
            "edge_eval:requests:rate5m", "edge_eval:api_cost_usd:rate5m", "edge_eval:local_cost_usd:rate5m",
            "edge_proxy_fixed_cost_usd", "edge_proxy_economics_requests_total", "edge_proxy_requests_total", "edge_proxy_energy_cost_usd_total")}
        assert result, expr
        assert math.isfinite(value) and value > 0, (expr, value, debug)
    q_ret = float(_prom_query(stack["prom"], "edge_eval:quantization_fidelity_percent:max")["data"]["result"][0]["value"][1])
    assert q_ret == pytest.approx(0.6 / 0.62 * 100)

    # The model template variable's query finds the model.
    url = f"{stack['prom']}/api/v1/label/model/values?" + urllib.parse.urlencode(
        {"match[]": "edge_proxy_economics_requests_total"})
    with urllib.request.urlopen(url, timeout=10) as resp:
        assert MODEL in json.loads(resp.read())["data"]
