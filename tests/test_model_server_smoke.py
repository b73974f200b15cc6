"""Smoke test of the shared fixtures: synth, serve, /health, /info."""
from __future__ import annotations

import json
import urllib.request


def test_fixture_server_ready_and_info(model_server, tiny_model_dir):
    with urllib.request.urlopen(model_server.url + "/info", timeout=5) as r:
        info = json.load(r)
    cfg = json.load(open(f"{tiny_model_dir}/config.json"))
    assert cfg["edge_eval_synthetic"] is True
    assert info["state"] == "ready" and info["ready"] is True
    assert info["synthetic"] is True
    assert info["engine"] == "transformers"
    assert info["max_total_tokens"] == cfg["max_position_embeddings"]
