"""The mma kernel's measured configurations: the table's lookup (model_server/int4_mma_tuned.py), how choose_config
uses it, and benchmarks/int4_mma_tune.py writing it from a sweep's result. On CPU: no kernel runs here."""
from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from model_server import int4_mma, int4_mma_tuned
from model_server.switches import SwitchValueError

ROOT = Path(__file__).resolve().parents[1]


def _entry(m: int, n: int, k: int, cfg: int4_mma.Config, sms: int = 132, **extra) -> dict:
    return {"num_sms": sms, "n": n, "k": k, "m": m, "config": {**vars(cfg)}, "us": 1.0, **extra}


@pytest.fixture()
def table(monkeypatch, tmp_path: Path):
    """Point the lookup at a table of the test's own; read afresh before and after."""
    path = tmp_path / "tuned.json"
    monkeypatch.setattr(int4_mma_tuned, "TABLE", path)
    monkeypatch.delenv(int4_mma_tuned.SWITCH, raising=False)
    int4_mma_tuned.reload()
    yield path
    int4_mma_tuned.reload()


def _write(path: Path, entries: list[dict]) -> None:
    path.write_text(json.dumps({"configs": entries}))
    int4_mma_tuned.reload()


def test_a_step_takes_the_entry_of_fewest_measured_rows_at_or_above_its_own(table: Path) -> None:
    one, eight = int4_mma.Config(1, 4, 4, 4, 4, 1), int4_mma.Config(1, 1, 8, 2, 4, 1)
    sixteen = int4_mma.Config(2, 1, 4, 4, 4, 1, 2)
    _write(table, [_entry(8, 16384, 2048, eight), _entry(1, 16384, 2048, one), _entry(16, 16384, 2048, sixteen)])
    assert int4_mma.choose_config(1, 16384, 2048, 132) == one
    assert [int4_mma.choose_config(m, 16384, 2048, 132) for m in (2, 5, 8)] == [eight] * 3
    assert int4_mma.choose_config(9, 16384, 2048, 132) == sixteen == int4_mma.choose_config(16, 16384, 2048, 132)
    # another card, shape or tile count: the rule with FLAT
    for m, n, k, sms in ((1, 16384, 2048, 108), (1, 16384, 4096, 132), (17, 16384, 2048, 132), (1, 3072, 2048, 132)):
        assert int4_mma.choose_config(m, n, k, sms) == int4_mma.rule_config(m, n, k, sms, flat=1)


def test_past_the_measured_rows_the_most_rows_entry_serves(table: Path) -> None:
    four = int4_mma.Config(1, 2, 4, 4, 4, 1)
    _write(table, [_entry(4, 16384, 2048, four)])
    assert int4_mma.choose_config(8, 16384, 2048, 132) == four
    assert int4_mma_tuned.match([], 3) is None


def test_the_rule_switch_ignores_the_table_and_a_bad_value_is_one_line(table: Path, monkeypatch) -> None:
    cfg = int4_mma.Config(1, 4, 4, 4, 4, 1)
    _write(table, [_entry(1, 16384, 2048, cfg)])
    monkeypatch.setenv(int4_mma_tuned.SWITCH, "rule")
    int4_mma_tuned.reload()
    assert int4_mma.choose_config(1, 16384, 2048, 132) == int4_mma.rule_config(1, 16384, 2048, 132)
    assert int4_mma.choose_config(1, 16384, 2048, 132).flat == 0      # as served before the table
    monkeypatch.setenv(int4_mma_tuned.SWITCH, "fastest")
    int4_mma_tuned.reload()
    with pytest.raises(SwitchValueError, match="MODEL_SERVER_INT4_MMA_CONFIGS must be one of tuned, rule"):
        int4_mma.choose_config(1, 16384, 2048, 132)


def test_an_entry_that_cannot_run_the_step_falls_back_to_the_rule(table: Path) -> None:
    bad = [int4_mma.Config(1, 1, 4, 4, 3, 1),             # split 3 does not divide 32 blocks
           int4_mma.Config(1, 1, 6, 4, 1, 1, 4),          # 6 warps not a multiple of kw 4
           int4_mma.Config(1, 1, 8, 4, 1, 0, 2),          # KW without FLAT: the .cu has no such variant
           int4_mma.Config(1, 8, 8, 8, 1, 1)]             # shared memory past MAX_SMEM
    for cfg in bad:
        _write(table, [_entry(1, 2048, 2048, cfg)])
        assert int4_mma.choose_config(1, 2048, 2048, 132) == int4_mma.rule_config(1, 2048, 2048, 132, flat=1), cfg


def test_a_missing_or_torn_table_is_one_warning_and_the_rule(table: Path, caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="model_server.int4_mma_tuned"):
        assert int4_mma_tuned.lookup(1, 2048, 2048, 1, 132) is None            # no file
        table.write_text('{"configs": [')
        int4_mma_tuned.reload()
        assert int4_mma.choose_config(1, 2048, 2048, 132) == int4_mma.rule_config(1, 2048, 2048, 132, flat=1)
        good = int4_mma.Config(1, 1, 4, 6, 8, 1)
        table.write_text(json.dumps({"configs": [{"num_sms": 132, "n": 2048}, _entry(1, 2048, 2048, good)]}))
        int4_mma_tuned.reload()
        assert int4_mma.choose_config(1, 2048, 2048, 132) == good               # the whole entries still serve
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 3 and "not read" in msgs[0] and "not read" in msgs[1] and "1 of 2" in msgs[2]
    assert all("\n" not in m for m in msgs)


def test_the_shipped_table_holds_configs_that_fit_and_beat_the_rule() -> None:
    int4_mma_tuned.reload()
    data = json.loads(int4_mma_tuned.TABLE.read_text())
    assert data["configs"]
    for e in data["configs"]:
        cfg = int4_mma.Config(**e["config"])
        assert cfg.nt == int4_mma.token_tiles(e["m"]) and int4_mma.fits(cfg, e["m"], e["k"])
        assert (ROOT / e["source"]).is_file()
        if e.get("rule_flat"):           # a measured cell the rule with FLAT served within the margin keeps it
            assert cfg == int4_mma.rule_config(e["m"], e["n"], e["k"], e["num_sms"], flat=1)
            assert e["us"] == e["rule_flat_us"]
        else:
            assert e["us"] < e["rule_flat_us"]
        assert int4_mma.choose_config(e["m"], e["n"], e["k"], e["num_sms"]) == cfg


def _result(tmp_path: Path) -> Path:
    """An int4_mma_bench result with three cells: one whose sweep wins by 20 %, one by 1 %, and the LM head."""
    rule = int4_mma.rule_config(8, 16384, 2048, 132)
    flat = int4_mma.Config(**{**vars(rule), "flat": 1})
    win, near = int4_mma.Config(1, 2, 4, 4, 4, 1), int4_mma.Config(1, 1, 4, 4, 8, 1)
    cells = [
        {"name": "gate_up_proj", "n": 16384, "k": 2048, "m": 8, "mma_config": vars(rule),
         "us": {"mma": 14.0, "mma_flat": 13.0, "mma_kw": 15.0}, "err": {"mma": 2e-3, "mma_flat": 2e-3, "mma_kw": 2e-3},
         "sweep": [{"config": vars(win), "err": 2e-3, "us": 10.4}, {"config": vars(flat), "err": 0.5, "us": 1.0},
                   {"config": vars(near), "error": "RuntimeError()"}]},
        {"name": "o_proj", "n": 2048, "k": 2048, "m": 8, "mma_config": vars(int4_mma.rule_config(8, 2048, 2048, 132)),
         "us": {"mma": 6.0, "mma_flat": 5.7}, "err": {"mma": 2e-3, "mma_flat": 2e-3},
         "sweep": [{"config": vars(near), "err": 2e-3, "us": 5.65}]},
        {"name": "lm_head", "n": 128256, "k": 2048, "m": 8, "us": {"mma_flat": 60.0}, "err": {}, "sweep": []},
    ]
    path = tmp_path / "int4_mma.json"
    path.write_text(json.dumps({"device": "card", "group": 128, "num_sms": 132, "cells": cells}))
    return path


def _tune(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "int4_mma_tune.py"), *args],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_the_tune_script_enters_clear_wins_only_and_replaces_same_cells(tmp_path: Path) -> None:
    out = tmp_path / "table.json"
    old = _entry(8, 16384, 2048, int4_mma.Config(1, 1, 8, 4, 4, 1), us=12.0, rule_flat_us=13.0)
    keep = _entry(1, 3072, 2048, int4_mma.Config(1, 1, 4, 6, 8, 1), us=5.0, rule_flat_us=6.0)
    out.write_text(json.dumps({"about": "mine", "configs": [old, keep]}))
    done = _tune(str(_result(tmp_path)), "--table", str(out))
    assert done.returncode == 0, done.stderr
    table = json.loads(out.read_text())
    assert table["about"] == "mine" and len(table["configs"]) == 3
    new = next(e for e in table["configs"] if e["n"] == 16384)
    assert new["config"] == vars(int4_mma.Config(1, 2, 4, 4, 4, 1)) and new["us"] == 10.4 and new["rule_flat_us"] == 13.0
    assert keep in table["configs"]
    # o_proj's 1 % entered as the rule with FLAT, its own measured answer (a step of its rows keeps it)
    o = next(e for e in table["configs"] if e["n"] == 2048)
    assert o["rule_flat"] and o["config"] == vars(int4_mma.rule_config(8, 2048, 2048, 132, flat=1)) and o["us"] == 5.7
    assert "M=8: 10.40 us (rule with FLAT 13.00)" in done.stdout and "(the rule with FLAT kept)" in done.stdout


def test_the_tune_script_enters_a_swept_lm_head_and_the_engine_then_picks_it(tmp_path: Path, monkeypatch) -> None:
    rule = int4_mma.rule_config(1, 128256, 2048, 132)
    win = int4_mma.Config(1, 4, 4, 6, 1, 1)
    cell = {"name": "lm_head", "n": 128256, "k": 2048, "m": 1, "mma_config": vars(rule),
            "us": {"mma": 60.0, "mma_flat": 59.0}, "err": {"mma": 2e-3, "mma_flat": 2e-3},
            "sweep": [{"config": vars(win), "err": 2e-3, "us": 44.0}]}
    res = tmp_path / "lm.json"
    res.write_text(json.dumps({"device": "card", "group": 128, "num_sms": 132, "shapes": ["lm_head"], "cells": [cell]}))
    out = tmp_path / "table.json"
    done = _tune(str(res), "--table", str(out))
    assert done.returncode == 0, done.stderr
    [entry] = json.loads(out.read_text())["configs"]
    assert entry["n"] == 128256 and entry["config"] == vars(win) and entry["us"] == 44.0 and not entry.get("rule_flat")
    monkeypatch.setattr(int4_mma_tuned, "TABLE", out)
    int4_mma_tuned.reload()
    try:
        assert int4_mma.choose_config(1, 128256, 2048, 132) == win
        assert int4_mma.choose_config(9, 128256, 2048, 132) == int4_mma.rule_config(9, 128256, 2048, 132, flat=1)
    finally:
        monkeypatch.undo()
        int4_mma_tuned.reload()


def test_the_tune_script_says_in_one_line_what_it_cannot_use(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    nosweep = tmp_path / "nosweep.json"
    nosweep.write_text(json.dumps({"num_sms": 132, "cells": [{"name": "o_proj", "sweep": []}]}))
    for path, words in ((bad, "is not an int4_mma_bench result"), (nosweep, "has no sweep"),
                        (tmp_path / "absent.json", "is not an int4_mma_bench result")):
        done = _tune(str(path), "--table", str(tmp_path / "t.json"))
        assert done.returncode == 2 and words in done.stderr and len(done.stderr.strip().splitlines()) == 1
        assert "Traceback" not in done.stderr and not (tmp_path / "t.json").exists()
    dry = _tune(str(_result(tmp_path)), "--table", str(tmp_path / "t.json"), "--dry-run")
    assert dry.returncode == 0 and "16384x2048 M=8" in dry.stdout and not (tmp_path / "t.json").exists()


def test_mma_max_rows_wide_layers_and_the_switch(monkeypatch):
    from model_server.int4 import MMA_MAX_ROWS, mma_max_rows, step_kernel
    from model_server.int4_choice import mma_bounds, mma_rows_switch
    from model_server.switches import SwitchValueError
    mma_rows_switch.cache_clear()
    try:
        monkeypatch.delenv("MODEL_SERVER_INT4_MMA_MAX_ROWS", raising=False)
        assert mma_max_rows() == MMA_MAX_ROWS == 16
        # narrow layers (q/k/v, o, down) leave the mma kernel after 16 rows, wide ones (gate/up, LM head) after 32
        assert [step_kernel("mma", "triton", r, 3072) for r in (16, 17, 32)] == ["mma", "triton", "triton"]
        assert [step_kernel("mma", "triton", r, 16384) for r in (16, 32, 33, 64)] == ["mma", "mma", "triton", "triton"]
        assert mma_max_rows(128256) == 32 and mma_max_rows(16383) == 16
        assert mma_bounds() == "16 rows (32 on layers of >= 16384 outputs)"
        mma_rows_switch.cache_clear()
        monkeypatch.setenv("MODEL_SERVER_INT4_MMA_MAX_ROWS", "8")       # one bound for every layer
        assert [step_kernel("mma", "triton", r, w) for r in (8, 9) for w in (2048, 16384)] == \
            ["mma", "mma", "triton", "triton"]
        assert mma_bounds() == "8 rows"
        for bad in ("0", "65", "x"):
            mma_rows_switch.cache_clear()
            monkeypatch.setenv("MODEL_SERVER_INT4_MMA_MAX_ROWS", bad)
            with pytest.raises(SwitchValueError, match="MODEL_SERVER_INT4_MMA_MAX_ROWS"):
                mma_max_rows()
    finally:
        mma_rows_switch.cache_clear()
