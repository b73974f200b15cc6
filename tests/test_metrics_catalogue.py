"""The metrics catalogue (edge_proxy/telemetry/catalogue.py) against what is really exported and
documented: a live scrape of the proxy (``edge-proxy serve --config``, energy from the recorded
replay trace, a real cold start of the test upstream it spawns) and of the tiny model server,
docs/metrics.md and docs/model_server.md, the Grafana dashboard and the recording rules."""
from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml
from prometheus_client.openmetrics.parser import text_string_to_metric_families as om_families
from prometheus_client.parser import text_string_to_metric_families
from text_generation import Client

from edge_proxy.telemetry.catalogue import CATALOGUE, CONDITIONS, TYPES, by_family, by_name, owner_of_sample
from tests.net_support import PROMETHEUS_ACCEPT, free_port
from tests.proxy_support import MODEL

ROOT = Path(__file__).resolve().parent.parent
TRACE = ROOT / "tests" / "data" / "energy_h200_recorded.jsonl"
NAME = re.compile(r"\b((?:edge_proxy|model_server)_[a-z0-9_]+)")


def scrape(url: str) -> dict[str, tuple[str, set[str], int]]:
    """family -> (type, label names, number of samples); prometheus_client's own ``<family>_created``
    gauges of counters, histograms and summaries are left out."""
    fams = list(text_string_to_metric_families(urllib.request.urlopen(url, timeout=10).read().decode()))
    typed = {f.name: f.type for f in fams}
    twice = sorted({f.name for f in fams if [g.name for g in fams].count(f.name) > 1})
    assert not twice, f"exported twice: {twice}"
    out: dict[str, tuple[str, set[str], int]] = {}
    for f in fams:
        base = f.name.removesuffix("_created")
        if base != f.name and typed.get(base) in ("counter", "histogram", "summary"):
            continue
        labels = {k for s in f.samples for k in s.labels} - {"le", "quantile"}
        out[f.name] = (f.type, labels, len(f.samples))
    return out


def check_against_catalogue(got: dict[str, tuple[str, set[str], int]], exporter: str,
                            conditions_on: set[str]) -> None:
    cat = by_family(exporter)
    unknown = sorted(set(got) - set(cat))
    assert not unknown, f"exported but not in the catalogue: {unknown}"
    for fam, (type_, labels, n) in got.items():
        spec = cat[fam]
        assert type_ == spec.type, (spec.name, type_, spec.type)
        assert n > 0, f"{spec.name}: no sample in this scrape, its labels are unchecked"
        assert labels == set(spec.labels), (spec.name, sorted(labels), spec.labels)
    missing = sorted(s.name for s in cat.values()
                     if s.family not in got and (s.condition is None or s.condition in conditions_on))
    assert not missing, f"in the catalogue but not exported: {missing}"


def test_catalogue_is_well_formed() -> None:
    names = [m.name for m in CATALOGUE]
    assert len(names) == len(set(names))
    for m in CATALOGUE:
        assert m.type in TYPES and (m.condition is None or m.condition in CONDITIONS), m
        assert (m.type == "counter") == m.name.endswith("_total"), m.name
        assert re.fullmatch(r"(edge_proxy|model_server)_[a-z0-9_]+", m.name), m.name
        if m.unit in ("seconds", "joules", "watts", "usd", "bytes", "percent"):
            assert f"_{m.unit}" in m.name, (m.name, m.unit)      # units in every name that carries one
    assert owner_of_sample("edge_proxy_request_duration_seconds_bucket").name == "edge_proxy_request_duration_seconds"
    assert owner_of_sample("edge_proxy_requests_created").name == "edge_proxy_requests_total"
    assert owner_of_sample("edge_proxy_requests_bucket") is None


def _serve(tmp_path: Path, log: Any) -> tuple[subprocess.Popen[bytes], str, str]:
    port, metrics_port, backend_port = free_port(), free_port(), free_port()
    probes = tmp_path / "golden.jsonl"
    probes.write_text(json.dumps({"prompt": "say hello", "expected": "hello", "max_tokens": 2}) + "\n")
    cfg = {
        "proxy": {"backend_url": f"http://127.0.0.1:{backend_port}", "port": port,
                  "metrics_port": metrics_port, "model_name": MODEL, "access_log": "none"},
        "energy": {"source": "replay", "replay_path": str(TRACE), "period_seconds": 0.05},
        "coldstart": {"spawn": f"{sys.executable} -m tests.proxy_support --port {{port}}",
                      "max_wait_seconds": 60},
        "economics": {"scores": {MODEL: 0.7}, "reference_scores": {MODEL: 0.75},
                      "model_gigabytes": {MODEL: 0.5}, "feedback_token": "t", "probes_path": str(probes),
                      "probe_interval_seconds": 0.5, "adaptation_joules": 1000.0},
    }
    (tmp_path / "proxy.yaml").write_text(yaml.safe_dump(cfg))
    proc = subprocess.Popen([sys.executable, "-m", "edge_proxy", "serve", "--config", str(tmp_path / "proxy.yaml")],
                            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    return proc, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}"


def _value(url: str, name: str) -> float:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples if s.name == name)


def test_proxy_scrape_matches_catalogue(tmp_path: Path) -> None:
    """Every family the proxy exports (energy on, hold mode with a real cold start, --config) is in
    the catalogue with its type and label names, and every catalogue entry of the proxy whose
    condition holds here is exported."""
    log = open(tmp_path / "proxy.log", "wb")
    proc, base, metrics = _serve(tmp_path, log)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(metrics + "/healthz", timeout=2)
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, \
                    (tmp_path / "proxy.log").read_text()[-2000:]
                time.sleep(0.1)
        client = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=60)
        stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi there"}],
                                                max_tokens=4, stream=True)   # held: the cold start
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert Client(base, timeout=60).generate("hello world", max_new_tokens=3).details.generated_tokens == 3
        # the reloader's counter exists once its SIGHUP handler is installed (same loop turn)
        while "edge_proxy_config_reloads_total" not in urllib.request.urlopen(metrics + "/metrics").read().decode():
            assert time.monotonic() < deadline
            time.sleep(0.1)
        proc.send_signal(signal.SIGHUP)           # the price-sheet reloader counts a reload
        deadline = time.monotonic() + 30
        while (_value(metrics + "/metrics", "edge_proxy_economics_requests_total") < 2
               or _value(metrics + "/metrics", "edge_proxy_quality_probes_total") < 1
               or _value(metrics + "/metrics", "edge_proxy_config_reloads_total") < 1
               # the cold start's energy is observed once a sampler tick reaches its end (later on a loaded host)
               or _value(metrics + "/metrics", "edge_proxy_cold_start_energy_joules_count") < 1):
            assert time.monotonic() < deadline, "requests, probe, reload or cold-start energy not counted"
            time.sleep(0.2)
        got = scrape(metrics + "/metrics")
        om = urllib.request.urlopen(urllib.request.Request(metrics + "/metrics", headers={"Accept": PROMETHEUS_ACCEPT}),
                                    timeout=10)
        om_type, om_text = om.headers["Content-Type"], om.read().decode()
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()
    check_against_catalogue(got, "edge-proxy", {"energy", "coldstart", "config_file"})
    # what Prometheus asks for: OpenMetrics, the same families (counters without _total), with each counter's
    # created timestamp (what created-timestamp zero ingestion needs to see a first cold start rise from 0)
    assert om_type.startswith("application/openmetrics-text"), om_type
    fams = {f.name: f for f in om_families(om_text)}
    assert set(fams) == {n.removesuffix("_total") if t == "counter" else n for n, (t, _, _) in got.items()}
    cold = fams["edge_proxy_economics_cold_starts"]
    assert {s.name for s in cold.samples} == {"edge_proxy_economics_cold_starts_total",
                                              "edge_proxy_economics_cold_starts_created"}


def test_model_server_scrape_matches_catalogue(model_server) -> None:
    """The same for the model server's own /metrics after one request (the engine step counter
    only where the engine counts steps)."""
    client = openai.OpenAI(base_url=model_server.url + "/v1", api_key="x", max_retries=0, timeout=60)
    model = client.models.list().data[0].id
    assert client.completions.create(model=model, prompt="hello", max_tokens=2).usage.completion_tokens >= 1
    got = scrape(model_server.url + "/metrics")
    check_against_catalogue(got, "model-server", set())
    # what Prometheus asks for: OpenMetrics, the same families (counters without _total), counters with _created
    om = urllib.request.urlopen(urllib.request.Request(model_server.url + "/metrics",
                                                       headers={"Accept": PROMETHEUS_ACCEPT}), timeout=10)
    assert om.headers["Content-Type"].startswith("application/openmetrics-text"), om.headers["Content-Type"]
    fams = {f.name: f for f in om_families(om.read().decode())}
    assert set(fams) == {n.removesuffix("_total") if t == "counter" else n for n, (t, _, _) in got.items()}
    assert {s.name for s in fams["model_server_requests"].samples} == {"model_server_requests_total",
                                                                      "model_server_requests_created"}


def _table_rows(md: str) -> list[dict[str, str]]:
    """Rows of every markdown table, as {header: cell}."""
    rows: list[dict[str, str]] = []
    header: list[str] | None = None
    for line in md.splitlines():
        if not line.startswith("|"):
            header = None
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if header is None:
            header = cells
        elif not all(set(c) <= set("-: ") for c in cells):
            rows.append(dict(zip(header, cells)))
    return rows


def _documented(path: Path, prefix: str) -> dict[str, dict[str, str]]:
    """Names (with ``prefix``) in the first cell of the tables of ``path``: name -> its row; labels
    in braces after a name go to ``row["{}"]``; ``x_{a,b}_y`` in a name stands for x_a_y and x_b_y."""
    out: dict[str, dict[str, str]] = {}
    for row in _table_rows(path.read_text()):
        first = next(iter(row.values()), "")
        for token in re.findall(r"`(" + prefix + r"[^`]*)`", first):
            m = re.fullmatch(r"(.*?[a-z0-9])(\{[^{}]*\})?", token)
            assert m is not None, token
            names = [m.group(1)]
            while any("{" in n for n in names):
                n = next(n for n in names if "{" in n)
                alt = re.search(r"\{([^{}]*)\}", n)
                assert alt is not None, token
                names.remove(n)
                names += [n[:alt.start()] + a.strip() + n[alt.end():] for a in alt.group(1).split(",")]
            for name in names:
                assert re.fullmatch(r"[a-z0-9_]+", name), f"{path.name}: cannot read {token!r}"
                assert name not in out, f"{path.name}: {name} in two table rows"
                out[name] = {**row, "{}": m.group(2) or ""}
    return out


@pytest.mark.parametrize("doc,prefix,exporter", [("metrics.md", "edge_proxy_", "edge-proxy"),
                                                 ("model_server.md", "model_server_", "model-server")])
def test_docs_tables_match_catalogue(doc: str, prefix: str, exporter: str) -> None:
    """docs/metrics.md (proxy) and docs/model_server.md (model server) list exactly the catalogue's
    names in their tables, with the same type and label names where a row gives them."""
    documented = _documented(ROOT / "docs" / doc, prefix)
    cat = by_name(exporter)
    assert not sorted(set(documented) - set(cat)), f"docs/{doc} lists names not in the catalogue"
    assert not sorted(set(cat) - set(documented)), f"docs/{doc} misses catalogue names"
    for name, row in documented.items():
        spec = cat[name]
        if row["{}"]:
            assert set(filter(None, row["{}"].strip("{}").replace(" ", "").split(","))) == set(spec.labels), name
        if "type" in row:
            assert row["type"].split()[0] == spec.type, (name, row["type"])
        if "labels" in row:
            cell = re.sub(r"\([^)]*\)", "", row["labels"]).split(":")[0].replace("`", "")
            assert {x.strip() for x in cell.split(",") if x.strip() not in ("", "-")} == set(spec.labels), name


def test_dashboard_and_recording_rules_use_catalogued_names() -> None:
    """Every edge_proxy_* / model_server_* series the Grafana dashboard and the recording rules
    query is exported (other exporters' series, e.g. DCGM and kube-state-metrics, are not checked)."""
    dash = json.loads((ROOT / "grafana" / "dashboards" / "edge-eval.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [v.get("query", "") if isinstance(v.get("query"), str) else json.dumps(v.get("query"))
              for v in dash["templating"]["list"]]
    rules = yaml.safe_load((ROOT / "grafana" / "rules" / "edge-eval.rules.yml").read_text())
    exprs += [r["expr"] for g in rules["groups"] for r in g["rules"]]
    used = {n for e in exprs for n in NAME.findall(e)}
    assert len(used) >= 20
    unknown = sorted(n for n in used if owner_of_sample(n) is None)
    assert not unknown, f"queried but not in the catalogue: {unknown}"
