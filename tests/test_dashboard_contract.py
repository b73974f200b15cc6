"""What an SRE reads off the Grafana dashboard (issue 20): the paper's lines as thresholds, units,
environment template variables every panel honours, and no raw lifetime counters (which drop on a
restart). tests/test_dashboard_prometheus.py runs every query against a real Prometheus."""
from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DASH = json.loads((ROOT / "grafana" / "dashboards" / "edge-eval.json").read_text())
PANELS = [p for p in DASH["panels"] if p.get("type") != "row"]


def by_title(prefix: str) -> dict:
    (p,) = [p for p in PANELS if p["title"].startswith(prefix)]
    return p


def steps(p: dict) -> list[tuple[str, float | None]]:
    return [(s["color"], s["value"]) for s in p["fieldConfig"]["defaults"]["thresholds"]["steps"]]


def test_paper_lines_are_the_thresholds() -> None:
    """EDGE-EVAL, ACL 2026 Industry Track, §3: N_break < 20 repays within an hour, C_tax > 100 is
    serverless-prohibitive, Q_ret >= 99.9 % passes."""
    assert steps(by_title("N_break")) == [("green", None), ("red", 20)]
    assert steps(by_title("C_tax")) == [("green", None), ("red", 100)]
    assert steps(by_title("Q_ret")) == [("red", None), ("green", 99.9)]
    for prefix in ("N_break", "C_tax", "Q_ret"):
        assert by_title(prefix)["fieldConfig"]["defaults"]["color"] == {"mode": "thresholds"}


def test_units() -> None:
    unit = {p["title"]: p["fieldConfig"]["defaults"].get("unit") for p in PANELS}
    assert unit["Energy per request and per output token (J)"] == "joule"
    assert unit["Request energy percentiles (J)"] == "joule"
    assert unit["Power (W, from the energy counter)"] == "watt"
    assert unit["Output tokens/s (user traffic)"] == "suffix: tok/s"
    assert unit["Q_ret: quantization fidelity (%)"] == "percent"
    assert {t for t, u in unit.items() if "USD" in t} and all(
        u == "currencyUSD" for t, u in unit.items() if "USD" in t)


def test_template_variables_and_every_panel_honours_them() -> None:
    names = [v["name"] for v in DASH["templating"]["list"]]
    assert names == ["datasource", "cluster", "namespace", "pod", "model"]
    model = DASH["templating"]["list"][-1]
    assert "$namespace" in model["definition"] and "$cluster" in model["definition"]
    for p in PANELS:
        for t in p["targets"]:
            e = t["expr"]
            assert "$namespace" in e and "$cluster" in e, (p["title"], e)
            if not p.get("edgeEvalRequires"):      # other exporters' series carry no model label
                assert "$model" in e, (p["title"], e)


def test_no_raw_lifetime_counters() -> None:
    """A counter is read through rate() or increase(), or only for its labels (group by)."""
    raw = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*_total)\{[^}]*\}(\[)?")
    for p in PANELS:
        for t in p["targets"]:
            e = t["expr"]
            for m in raw.finditer(e):
                if m.group(2):
                    continue                                     # a range vector: inside rate/increase
                before = e[:m.start()].rstrip()
                assert re.search(r"group by \((instance|pod)\) \($", before), (p["title"], m.group(0))


def test_missing_panels_are_there() -> None:
    titles = {p["title"] for p in PANELS}
    for t in ("Error ratio", "Hold rejections (503 by reason)", "Model-server saturation: in flight and queue",
              "Replicas and demand", "GPU memory used", "KEDA scaler active"):
        assert t in titles, t
    assert "edge_proxy_cold_start_rejected_requests_total" in json.dumps(DASH)


def test_every_energy_derived_number_shows_its_source() -> None:
    """Issue 18: the energy source (source, kind, scope) and, per model, where the economics inputs
    come from (edge_proxy_economics_sources_info) are on the dashboard, next to what they explain."""
    src = by_title("Energy source")
    (expr,) = [t["expr"] for t in src["targets"]]
    assert expr.startswith("max by (source, kind, scope) (") and "edge_proxy_energy_source_info{" in expr
    assert "{{kind}}" in src["targets"][0]["legendFormat"] and "{{scope}}" in src["targets"][0]["legendFormat"]
    table = by_title("Sources of the economics inputs")
    assert table["type"] == "table"
    (t,) = table["targets"]
    assert "edge_proxy_economics_sources_info{" in t["expr"] and t["format"] == "table"
    for label in ("model", "energy_source", "energy_kind", "energy_scope", "score_source", "weights_source"):
        assert label in t["expr"].split("(")[1], label      # kept by the aggregation: a table column
    # In the Cost row, beside the cost panels (rows split the dashboard by their y).
    rows = sorted((p["gridPos"]["y"], p["title"]) for p in DASH["panels"] if p.get("type") == "row")
    row = [title for y, title in rows if y < table["gridPos"]["y"]][-1]
    assert row == "Cost", row


def test_foreign_energy_is_shown() -> None:
    """Energy of GPU-busy ticks with none of this proxy's requests in flight (issue 18)."""
    p = by_title("Foreign energy ratio")
    assert p["fieldConfig"]["defaults"]["unit"] == "percentunit"
    assert "edge_proxy_foreign_energy_joules_total{" in p["targets"][0]["expr"]
    assert steps(p) == [("green", None), ("red", 0.2)]       # the EdgeEvalForeignEnergyHigh line
