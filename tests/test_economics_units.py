"""Economics pieces without a network: probe checkers and file parsing, the bounded feedback map,
the busy-time clock, paper mode of the live observer (flat API price, nominal sizes, energy-only
costs), and cold starts (pushed and picked up from the gate, counted once)."""
from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from edge_proxy.config import ConfigError, load_settings
from edge_proxy.economics.formulas import PAPER, energy_cost_usd
from edge_proxy.economics.live import EconomicsObserver
from edge_proxy.economics.window import BusyClock as _BusyClock
from edge_proxy.proxy.hooks import EnergyAttribution, RequestRecord
from edge_proxy.economics.quality import GoldenPrompt, RecentRequests, load_golden_prompts, load_quality_results


class FakeClock:
    def __init__(self) -> None:
        self.t = 1_000_000_000

    def __call__(self) -> int:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += int(seconds * 1e9)


def _metrics(reg: CollectorRegistry) -> dict[tuple[str, tuple], float]:
    out = {}
    for fam in text_string_to_metric_families(generate_latest(reg).decode()):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _request(obs: EconomicsObserver, clock: FakeClock, rid: str, seconds: float, joules: float,
             n_in: int = 10, n_out: int = 20, model: str = "m", traffic: str = "user") -> RequestRecord:
    rec = RequestRecord(request_id=rid, route="/v1/completions", api="openai", model=model,
                        t_received_ns=clock())
    rec.traffic = traffic  # type: ignore[assignment]
    obs.on_request_start(rec)
    clock.advance(seconds)
    rec.t_end_ns = clock()
    rec.input_tokens, rec.output_tokens, rec.outcome = n_in, n_out, "ok"
    rec.energy = EnergyAttribution(active_joules=joules / 2, full_joules=joules, source="nvml",
                                   provisional=False)
    obs.on_request_end(rec)
    obs.on_request_final(rec)
    return rec


def test_checkers() -> None:
    assert GoldenPrompt("a", "p", "Paris", "exact").check("  Paris\n")
    assert not GoldenPrompt("a", "p", "Paris", "exact").check("Paris.")
    assert GoldenPrompt("a", "p", "Paris", "contains").check("It is Paris.")
    assert not GoldenPrompt("a", "p", "Paris", "contains").check("paris")
    assert GoldenPrompt("a", "p", r"\b4[0-9]\b", "regex").check("the answer is 42")
    assert not GoldenPrompt("a", "p", r"^4", "regex").check("x4")


def test_golden_file_errors(tmp_path: Path) -> None:
    f = tmp_path / "g.jsonl"
    f.write_text('# comment\n\n{"prompt": "p", "expected": "x", "checker": "exact", "max_tokens": 3}\n')
    (g,) = load_golden_prompts(f)
    assert (g.checker, g.max_tokens, g.id) == ("exact", 3, "3")
    for bad, msg in (('{"prompt": "p"}', "expected"), ('nope', "not JSON"),
                     ('{"prompt": "p", "expected": "(", "checker": "regex"}', "bad regex"),
                     ('{"prompt": "p", "expected": "x", "checker": "fuzzy"}', "checker"), ('', "no golden")):
        f.write_text(bad + "\n")
        with pytest.raises(ConfigError, match=msg):
            load_golden_prompts(f)
    with pytest.raises(ConfigError, match="probes file"):
        load_golden_prompts(tmp_path / "missing.jsonl")


def test_quality_results_file(tmp_path: Path) -> None:
    f = tmp_path / "r.json"
    f.write_text(json.dumps({"llama-int4": {"score": 0.75, "reference_score": 0.8}, "x": {"score": 1}}))
    assert load_quality_results(f) == {"llama-int4": (0.75, 0.8), "x": (1.0, None)}
    f.write_text(json.dumps({"bad": {"reference_score": 1}}))
    with pytest.raises(ConfigError, match="numeric score"):
        load_quality_results(f)


def test_recent_requests_bounded() -> None:
    r = RecentRequests(capacity=3)
    for i in range(5):
        r.add(f"id{i}", "m", float(i))
    assert len(r) == 3
    assert r.get("id0") is None and r.get("id1") is None
    assert r.get("id4").joules == 4.0


def test_busy_clock_shares_sum_to_busy_time() -> None:
    c = _BusyClock()
    s = 1_000_000_000
    a = c.start(0)               # A alone 0..1 s, A+B 1..3 s, B alone 3..4 s
    b = c.start(s)
    share_a = c.end(3 * s, a)
    share_b = c.end(4 * s, b)
    assert share_a == pytest.approx(1 + 2 / 2)
    assert share_b == pytest.approx(2 / 2 + 1)
    assert share_a + share_b == pytest.approx(4.0)


def test_paper_mode_live() -> None:
    settings = load_settings(environ={}, overrides={
        ("economics", "mode"): "paper", ("economics", "adaptation_joules"): 92122.0,
        ("economics", "gpu_usd_per_hour"): 100.0, ("economics", "pue"): 2.0,
        ("economics", "paper_model_sizes"): {"m": "1B:INT4"}, ("economics", "scores"): {"m": 0.752},
        ("economics", "reference_scores"): {"m": 0.742}})
    clock, reg = FakeClock(), CollectorRegistry()
    obs = EconomicsObserver(settings, reg, clock_ns=clock)
    for i in range(4):
        _request(obs, clock, f"r{i}", seconds=0.5, joules=2.36)
    _request(obs, clock, "probe", seconds=0.5, joules=50.0, traffic="probe")   # kept out
    m = _metrics(reg)
    lab = (("model", "m"),)
    # Paper: flat API price per request, energy-only local cost (no PUE, no GPU rental).
    assert m[("edge_proxy_api_equivalent_cost_usd_total", lab)] == pytest.approx(4 * PAPER.api_cost_per_request_usd)
    assert m[("edge_proxy_hardware_cost_usd_total", lab)] == 0
    assert m[("edge_proxy_energy_cost_usd_total", lab)] == pytest.approx(4 * 2.36 / 3.6e6 * 0.12)
    assert m[("edge_proxy_economics_requests_total", lab)] == 4
    # The paper's Llama-1B LoRA rag INT4 row: N_break 2.5, IPW 0.318 (same inputs, §5.10).
    conf = (("model", "m"), ("source", "configured"))     # configured scores and C_train
    assert m[("edge_proxy_break_even_requests", conf)] == pytest.approx(2.457, abs=1e-3)
    assert m[("edge_proxy_intelligence_per_joule", conf)] == pytest.approx(0.752 / 2.36)
    assert m[("edge_proxy_quantization_fidelity_percent", conf)] == pytest.approx(0.752 / 0.742 * 100)
    w = [v for (name, labels), v in m.items() if name == "edge_proxy_model_weight_bytes"]
    assert w == [PAPER.model_gigabytes("1B", "INT4") * 1e9]
    # 4 x 20 output tokens over 2.5 s elapsed since the first request started (the probe took 0.5 s).
    assert m[("edge_proxy_system_density_tokens_per_second_per_gigabyte", lab)] == pytest.approx(80 / 2.5 / 0.625)


def test_bad_paper_size_is_a_config_error() -> None:
    settings = load_settings(environ={}, overrides={("economics", "paper_model_sizes"): {"m": "13B:INT4"}})
    with pytest.raises(ConfigError, match="paper_model_sizes"):
        EconomicsObserver(settings, CollectorRegistry())


def test_cold_starts_counted_once_and_in_fixed_cost() -> None:
    settings = load_settings(environ={}, overrides={("economics", "setup_usd"): 1.0,
                                                    ("economics", "usd_per_kwh"): 0.5})
    clock, reg = FakeClock(), CollectorRegistry()
    history = [SimpleNamespace(id=1, outcome="ready", finalized=True, tax_joules=(720.0, "nvml"), seconds=6.0),
               SimpleNamespace(id=2, outcome="timeout", finalized=True, tax_joules=(None, "none"), seconds=300.0),
               # ready, but its energy window not closed yet: picked up later, not now with 0 J
               SimpleNamespace(id=3, outcome="ready", finalized=False, tax_joules=(None, "none"), seconds=5.0)]
    obs = EconomicsObserver(settings, reg, clock_ns=clock,
                            coldstart=SimpleNamespace(history=history))
    obs.runtime = SimpleNamespace(backend=SimpleNamespace(model="m"))
    for i in range(3):
        _request(obs, clock, f"r{i}", seconds=0.3, joules=[6.0, 7.2, 9.0][i])
    obs.record_cold_start(None, 720.0, 6.0, cold_start_id=1)     # pushed as well: counted once
    m = _metrics(reg)
    lab = (("model", "m"),)
    assert m[("edge_proxy_economics_cold_starts_total", lab)] == 1
    assert m[("edge_proxy_economics_cold_start_energy_joules_total", lab)] == 720.0
    # C_tax: mean cold-start joules / mean request joules (formulas.cold_start_tax_from_totals)
    assert m[("edge_proxy_cold_start_tax_energy_ratio", lab)] == pytest.approx(720.0 / ((6.0 + 7.2 + 9.0) / 3))
    assert m[("edge_proxy_cold_start_tax_time_ratio", lab)] == pytest.approx(6.0 / 0.3)
    assert m[("edge_proxy_fixed_cost_usd", lab)] == pytest.approx(1.0 + energy_cost_usd(720.0, 0.5))


def test_a_cold_start_finalized_between_scrapes_is_in_the_next_scrape_whole() -> None:
    """One scrape is consistent: a cold start whose energy window closed since the last scrape is
    in this scrape's counters and C_tax gauge (not half now, the rest a scrape later)."""
    settings = load_settings(environ={}, overrides={})
    clock, reg = FakeClock(), CollectorRegistry()
    cs = SimpleNamespace(id=7, outcome="ready", finalized=False, tax_joules=(None, "none"), seconds=4.0)
    obs = EconomicsObserver(settings, reg, clock_ns=clock, coldstart=SimpleNamespace(history=[cs]))
    obs.runtime = SimpleNamespace(backend=SimpleNamespace(model="m"))
    _request(obs, clock, "r0", seconds=0.5, joules=10.0)
    lab = (("model", "m"),)
    assert _metrics(reg)[("edge_proxy_economics_cold_starts_total", lab)] == 0
    cs.finalized, cs.tax_joules = True, (300.0, "replay")       # its window closed after that scrape
    m = _metrics(reg)
    assert m[("edge_proxy_economics_cold_starts_total", lab)] == 1
    assert m[("edge_proxy_economics_cold_start_energy_joules_total", lab)] == 300.0
    assert m[("edge_proxy_cold_start_tax_energy_ratio", lab)] == pytest.approx(30.0)


def test_api_cheaper_gives_infinite_break_even() -> None:
    settings = load_settings(environ={}, overrides={
        ("economics", "setup_usd"): 1.0, ("economics", "gpu_usd_per_hour"): 3600.0,
        ("economics", "api_usd_per_million_input_tokens"): 0.0,
        ("economics", "api_usd_per_million_output_tokens"): 0.0})
    clock, reg = FakeClock(), CollectorRegistry()
    obs = EconomicsObserver(settings, reg, clock_ns=clock)
    _request(obs, clock, "r", seconds=1.0, joules=1.0)
    m = _metrics(reg)
    assert math.isinf(m[("edge_proxy_break_even_requests", (("model", "m"), ("source", "configured")))])
    assert m[("edge_proxy_hardware_cost_usd_total", (("model", "m"),))] == pytest.approx(1.0)


def test_overhead_benchmark_runs(tmp_path: Path) -> None:
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, str(root / "benchmarks" / "economics_overhead.py"),
                          "--requests", "300", "--out", str(tmp_path)], capture_output=True, text=True,
                         timeout=120, cwd=root)
    assert out.returncode == 0, out.stderr
    rows = json.loads((tmp_path / "economics_overhead.json").read_text())
    assert [r["models"] for r in rows] == [1, 8]
    assert all(r["economics_us_per_request"] > 0 and r["scrape_ms_median"] > 0 for r in rows)
    assert "scrape ms" in out.stdout


def test_failed_requests_are_not_business_traffic() -> None:
    settings = load_settings(environ={}, overrides={("economics", "mode"): "paper"})
    clock, reg = FakeClock(), CollectorRegistry()
    obs = EconomicsObserver(settings, reg, clock_ns=clock)
    _request(obs, clock, "ok", seconds=0.1, joules=1.0)
    for outcome in ("error", "rejected", "timeout"):
        rec = RequestRecord(request_id=outcome, route="/v1/completions", api="openai", model="m",
                            t_received_ns=clock())
        obs.on_request_start(rec)
        rec.t_end_ns, rec.outcome = clock(), outcome  # type: ignore[assignment]
        obs.on_request_end(rec)
        obs.on_request_final(rec)
    m = _metrics(reg)
    assert m[("edge_proxy_economics_requests_total", (("model", "m"),))] == 1
    assert m[("edge_proxy_api_equivalent_cost_usd_total", (("model", "m"),))] == PAPER.api_cost_per_request_usd
    assert obs._busy.n == 0          # every start was matched by an end


def test_collector_describes_its_metrics_so_duplicates_are_refused() -> None:
    """The scrape-time collector names what it exports: registering it twice in one registry, or
    any metric reusing one of its names, is refused (it used to be exported twice, silently)."""
    from prometheus_client import Gauge

    from edge_proxy.economics.collector import EconomicsCollector

    settings = load_settings(environ={}, overrides={("economics", "scores"): {"m": 0.5}})
    reg = CollectorRegistry(auto_describe=True)          # as edge_proxy.proxy.server.build_proxy
    obs = EconomicsObserver(settings, reg)
    with pytest.raises(ValueError, match="Duplicated timeseries.*edge_proxy_break_even_requests"):
        reg.register(EconomicsCollector(obs.stats))
    for name in ("edge_proxy_break_even_requests", "edge_proxy_cold_start_tax_energy_ratio",
                 "edge_proxy_price_usd"):
        with pytest.raises(ValueError, match=name):
            Gauge(name, "x", registry=reg)
    # describe() names exactly what collect() exports
    described = {f.name for f in EconomicsCollector(obs.stats).describe()}
    collected = {f.name for f in EconomicsCollector(obs.stats).collect()}
    assert described == collected and "edge_proxy_intelligence_per_joule" in described


def test_cold_start_tax_gauge_agrees_with_the_recording_rule() -> None:
    """One C_tax definition: the per-instance gauge equals what edge_eval:cold_start_tax:ratio
    computes from the exported counters (mean cold-start joules / mean request joules)."""
    from edge_proxy.economics.formulas import cold_start_tax_from_totals

    assert cold_start_tax_from_totals(1440.0, 2, 60.0, 10) == pytest.approx(720.0 / 6.0)
    assert math.isnan(cold_start_tax_from_totals(0.0, 0, 60.0, 10))
    assert math.isnan(cold_start_tax_from_totals(100.0, 1, 0.0, 0))
    settings = load_settings(environ={}, overrides={})
    clock, reg = FakeClock(), CollectorRegistry()
    obs = EconomicsObserver(settings, reg, clock_ns=clock)
    for i, j in enumerate([1.0, 2.0, 12.0, 5.0]):           # mean 5 J, median 3.5 J
        _request(obs, clock, f"r{i}", seconds=0.2, joules=j)
    obs.record_cold_start("m", 300.0, 4.0)
    obs.record_cold_start("m", 700.0, 6.0)                  # mean 500 J
    m = _metrics(reg)
    lab = (("model", "m"),)
    rule = ((m[("edge_proxy_economics_cold_start_energy_joules_total", lab)]
             / m[("edge_proxy_economics_cold_starts_total", lab)])
            / (m[("edge_proxy_economics_energy_joules_total", lab)]
               / m[("edge_proxy_economics_requests_total", lab)]))
    assert rule == pytest.approx(100.0)
    assert m[("edge_proxy_cold_start_tax_energy_ratio", lab)] == pytest.approx(rule)
    assert m[("edge_proxy_cold_start_tax_time_ratio", lab)] == pytest.approx(5.0 / 0.2)
