"""examples/edge-proxy.yaml is the settings reference: it must load, name every key the code
knows, and give each key the code's default (so the documentation cannot drift from the code)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from edge_proxy.config import ConfigError, Settings, load_settings

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "edge-proxy.yaml"


def test_example_names_every_key_with_its_default() -> None:
    data = yaml.safe_load(EXAMPLE.read_text())
    defaults = Settings()
    for f in dataclasses.fields(Settings):
        section = getattr(defaults, f.name)
        keys = {g.name for g in dataclasses.fields(section)}
        assert set(data[f.name]) == keys, f"section {f.name}: example and code differ"
    loaded = load_settings(EXAMPLE, environ={})
    assert dataclasses.asdict(loaded) == dataclasses.asdict(defaults)


def test_unknown_key_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("proxy:\n  portz: 1\n")
    with pytest.raises(ConfigError, match="unknown key proxy.portz"):
        load_settings(bad, environ={})
