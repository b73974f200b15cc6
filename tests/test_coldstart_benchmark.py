"""benchmarks/cold_start.py runs end to end on CPU with the tiny model (the GPU run is the same
script with --preset llama-3.2-1b)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

pytestmark = pytest.mark.timeout(120)


def test_cold_start_benchmark_tiny_cpu(tiny_model_dir: str, tmp_path: Path) -> None:
    import cold_start  # benchmarks/cold_start.py

    rc = cold_start.main(["--preset", "tiny", "--model-dir", str(tiny_model_dir), "--device", "cpu",
                          "--variants", "none", "--cold-starts", "1", "--batch", "3",
                          "--warm-requests", "3", "--max-tokens", "3", "--idle-seconds", "0.5",
                          "--energy-source", "estimated", "--out", str(tmp_path)])
    assert rc == 0
    result = json.loads((tmp_path / "cold_start.json").read_text())
    v = result["variants"][0]
    cs = v["cold_starts"][0]
    assert cs["outcome"] == "ready" and cs["held_requests_with_header"] == 3
    offsets = [cs["milestones_seconds"][m] for m in
               ("hold_start", "process_start", "listening", "load_start", "load_end", "ready", "first_token")]
    assert None not in offsets and offsets == sorted(offsets)
    assert v["warm"][0]["ok"] == 3 and v["warm"][0]["output_tokens"] > 0   # streamed, usage read
    s = result["summary"][0]
    assert s["energy_source"] == "estimated"
    for key in ("cold_start_joules", "mean_request_joules", "c_tax_energy", "c_tax_time",
                "c_tax_paper_form"):
        assert s[key] is not None and s[key] > 0, key
    # the ratios are what their inputs say
    assert s["c_tax_energy"] == pytest.approx(s["cold_start_joules"] / s["mean_request_joules"])
    # The estimated source models CPU time x watts: on a quiet machine an idle model server burns
    # (almost) no CPU, so idle power can be 0 and the keep-warm break-even undefined.
    assert s["idle_watts"] is not None and s["idle_watts"] >= 0
    if s["idle_watts"] > 0:
        assert s["keep_warm_break_even_idle_seconds"] == pytest.approx(s["cold_start_joules"] / s["idle_watts"])
    else:
        assert s["keep_warm_break_even_idle_seconds"] in (None, float("inf"))
    # measured on to the engine warm (serve's background warm-up): never before the first token, never less energy
    assert cs["hold_to_engine_warm_seconds"] >= cs["seconds"]
    assert cs["energy_to_engine_warm_joules"] >= cs["energy_joules"]
    assert s["c_tax_energy_to_engine_warm"] == pytest.approx(s["cold_start_to_engine_warm_joules"]
                                                             / s["mean_request_joules"])
    md = (tmp_path / "cold_start.md").read_text()
    assert "| none |" in md and "C_tax" in md


def test_cold_start_benchmark_bad_args(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import cold_start

    assert cold_start.main(["--variants", "int3", "--out", str(tmp_path)]) == 2
    assert "unknown int3" in capsys.readouterr().err


def test_cold_start_phases_tiny_cpu(tiny_model_dir: str, tmp_path: Path) -> None:
    """benchmarks/cold_start_phases.py: two variants spawned on CPU, phases read from /info, the report's table."""
    import cold_start_phases  # benchmarks/cold_start_phases.py

    rc = cold_start_phases.main(["--model-dir", str(tiny_model_dir), "--device", "cpu", "--variants",
                                 "after,after-nodefer", "--steady-tokens", "0", "--commit", "test", "--importtime",
                                 "--evict-weights", "--out", str(tmp_path)])
    assert rc == 0
    report = json.loads((tmp_path / "cold_start_phases.json").read_text())
    runs = {r["variant"]: r for r in report["runs"]}
    assert set(runs) == {"after", "after-nodefer"}
    assert runs["after-nodefer"]["env"]["MODEL_SERVER_FAST_WARMUP_MAX_DEFER_S"] == "0"
    for r in runs.values():
        assert 0 < r["spawn_to_ready_s"] <= r["spawn_to_first_token_s"] and r["first_request_s"] > 0
        assert r["load_path"] == "native" and r["phases"]["imports_s"] > 0 and len(r["tokens"]) == 16
        parts = [r["phases"][k] for k in ("to_listening_s", "to_torch_s", "torch_to_device_s", "device_to_load_s")]
        assert min(parts) >= 0 and abs(sum(parts) - r["phases"]["imports_s"]) < 0.006     # imports_s in four
        assert "torch" in dict(r["imports_top_s"])
        assert r["phases"]["prefetch_s"] >= 0          # listening -> the weights prefetch's end (/info startup)
    assert report["first_request_tokens_identical_bf16"] is True
    table = (tmp_path / "cold_start_phases.md").read_text()
    assert "| first request s |" in table and table.count("| after") == 2
    assert "| to_listening | to_torch | torch_to_device | device_to_load | prefetch |" in table
    assert "top imports of after (-X importtime" in table
    assert (tmp_path / "cold_logs.tgz").stat().st_size > 0


def test_cold_start_phases_fastops_has_a_seed_of_its_own(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``seeded-fastops``: the two opt-in compile switches in the start's environment and in a seed filled with them,
    apart from the defaults' seed (which is filled without them); each seed is filled once per quantization."""
    import subprocess

    import cold_start_phases

    fills: list[dict] = []
    starts: list[tuple[str, str, dict]] = []

    def fill(cmd: list[str], env: dict, **_: object) -> subprocess.CompletedProcess:
        out = cmd[cmd.index("--out") + 1]
        fills.append({"out": out, "quant": cmd[cmd.index("--quantization") + 1],
                      "shapes": env.get("MODEL_SERVER_FAST_COMPILE_SHAPES"), "norm": env.get("MODEL_SERVER_FAST_NORM")})
        return subprocess.CompletedProcess(cmd, 0, "filled", "")

    def start(name: str, model_dir: Path, device: str, quant: str, env: dict, logs: Path, *_: object) -> dict:
        starts.append((name, quant, env))
        return {"variant": name.split("_", 1)[1], "quantization": quant, "env": env}

    monkeypatch.delenv("MODEL_SERVER_FAST_COMPILE_SHAPES", raising=False)
    monkeypatch.delenv("MODEL_SERVER_FAST_NORM", raising=False)
    monkeypatch.setattr(cold_start_phases.subprocess, "run", fill)
    monkeypatch.setattr(cold_start_phases, "one_start", start)
    rc = cold_start_phases.main(["--model-dir", str(tmp_path), "--device", "cpu", "--commit", "test", "--out",
                                 str(tmp_path / "out"), "--variants",
                                 "seeded,seeded-fastops,seeded-fastops-int4,seeded-fastops,seeded"])
    assert rc == 0
    by_out = {f["out"]: f for f in fills}
    assert len(fills) == len(by_out) == 3                              # bf16, bf16 with the switches, int4 with them
    seeds = [env["MODEL_SERVER_COMPILE_CACHE_SEED"] for _, _, env in starts]
    assert seeds[0] == seeds[4] != seeds[1] == seeds[3] != seeds[2]
    assert by_out[seeds[0]]["shapes"] is None and by_out[seeds[0]]["norm"] is None
    for i in (1, 2, 3):
        assert by_out[seeds[i]] == {"out": seeds[i], "quant": starts[i][1], "shapes": "rows", "norm": "triton"}
        assert starts[i][2]["MODEL_SERVER_FAST_COMPILE_SHAPES"] == "rows"
        assert starts[i][2]["MODEL_SERVER_FAST_NORM"] == "triton"
    assert "MODEL_SERVER_FAST_NORM" not in starts[0][2] and starts[2][1] == "int4"
    table = (tmp_path / "out" / "cold_start_phases.md").read_text()
    assert "seed fill (bf16-fastops)" in table and "seed fill (int4-fastops)" in table
