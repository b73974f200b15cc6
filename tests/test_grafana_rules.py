"""Recording rules: promtool validates them and runs their unit tests (grafana/rules/*_test.yml),
and the dashboard JSON is well formed and refers only to metrics that exist or are recorded."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "grafana" / "rules"
PROMTOOL = shutil.which("promtool")

needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (apt-get install prometheus)")


@needs_promtool
def test_rules_are_valid() -> None:
    files = sorted(str(p) for p in RULES.glob("*.rules.yml"))
    assert files
    out = subprocess.run([PROMTOOL, "check", "rules", *files], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


@needs_promtool
def test_rules_unit_tests() -> None:
    tests = sorted(p.name for p in RULES.glob("*_test.yml"))
    assert tests
    out = subprocess.run([PROMTOOL, "test", "rules", *tests], cwd=RULES, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_recorded_metric_has_a_promtool_test() -> None:
    rules = yaml.safe_load((RULES / "edge-eval.rules.yml").read_text())
    recorded = {r["record"] for g in rules["groups"] for r in g["rules"] if "record" in r}
    tested = "\n".join(p.read_text() for p in RULES.glob("*_test.yml"))
    final = {r for r in recorded if not r.endswith(":rate5m") or "system_density" in r}
    final -= {"edge_eval:quality_score:mean5m", "edge_eval:weight_gigabytes:sum"}
    missing = sorted(r for r in final if r not in tested)
    assert not missing, f"recording rules without a promtool test: {missing}"
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    untested = sorted(a for a in alerts if f"alertname: {a}\n" not in tested)
    assert len(alerts) >= 5
    assert not untested, f"alerts without a promtool test: {untested}"


def test_dashboard_json_is_well_formed() -> None:
    dash = json.loads((ROOT / "grafana" / "dashboards" / "edge-eval.json").read_text())
    panels = [p for p in dash["panels"] if p.get("type") != "row"]
    assert len(panels) >= 15
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in panels:
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["expr"].strip(), p["title"]
            assert t["datasource"]["uid"] == "${datasource}"
    names = {v["name"] for v in dash["templating"]["list"]}
    assert {"datasource", "model"} <= names
    prov = yaml.safe_load((ROOT / "grafana" / "provisioning" / "dashboards" / "edge-eval.yml").read_text())
    assert prov["providers"][0]["options"]["path"]
    ds = yaml.safe_load((ROOT / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    assert ds["datasources"][0]["type"] == "prometheus"


@needs_promtool
def test_example_prometheus_config_is_valid() -> None:
    out = subprocess.run([PROMTOOL, "check", "config", "prometheus.example.yml"], cwd=ROOT / "grafana",
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
