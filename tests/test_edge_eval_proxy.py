"""``edge-eval eval`` through a real edge-proxy in front of the real tiny model server: per-item
joules from the proxy's lookup endpoint, the results contract, --resume, an endpoint that goes
away (partial results, exit 1), a wrong lookup token (exit 2), and the lookup endpoint itself."""
from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.net_support import free_port
from tests.edge_eval_support import TOKEN, edge_proxy, run_eval

ARGS = ("--task", "rag", "--limit", "4", "--passes", "2", "--max-tokens", "6")


@pytest.mark.slow
def test_eval_through_proxy_results_resume_and_failures(model_server, tmp_path: Path) -> None:
    out = tmp_path / "run"
    with edge_proxy(model_server.url, "tiny-base") as proxy:
        r = run_eval(proxy, out, *ARGS)
        assert r.returncode == 0, r.stderr
        doc = json.loads((out / "results.json").read_text())
        assert doc["schema"] == 1 and doc["task"] == "rag" and doc["status"] == "complete"
        assert doc["model"] == "tiny-base"            # the proxy's label, from the lookup
        assert doc["passes"] == 2 and len(doc["items"]) == 8
        for it in doc["items"]:
            assert it["joules"] > 0 and it["joules_source"] == "estimated"
            assert it["output_tokens"] >= 1 and it["latency_seconds"] > 0
            assert set(it["scores"]) == {"f1", "exact_match"} and "output" not in it
        s = doc["summary"]
        assert s["n_items"] == 4 and s["n_requests"] == 8 and s["ci_over"] == "passes"
        assert s["joules_source"] == "estimated"
        mean_j = sum(i["joules"] for i in doc["items"]) / 8
        assert s["mean_joules_per_request"] == pytest.approx(mean_j)
        assert s["score_ci95"][0] <= s["mean_score"] <= s["score_ci95"][1]
        assert s["ipw_per_joule"] == pytest.approx(s["mean_score"] / mean_j)

        # the lookup endpoint: the same joules for a request id; auth; unknown ids
        rid = doc["items"][0]["request_id"]
        req = urllib.request.Request(f"{proxy.metrics_url}/edge/requests/{rid}",
                                     headers={"Authorization": f"Bearer {TOKEN}"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            got = json.loads(resp.read())
        assert got["final"] and got["energy"]["full_joules"] == pytest.approx(doc["items"][0]["joules"])
        for headers, code in (({}, 401), ({"Authorization": f"Bearer {TOKEN}"}, 404)):
            url = f"{proxy.metrics_url}/edge/requests/{'nope' if code == 404 else rid}"
            with pytest.raises(urllib.error.HTTPError) as err:
                urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10)
            assert err.value.code == code

        # --resume: drop the last 3 lines (as if interrupted): only those are redone
        lines = (out / "items.jsonl").read_text().splitlines()
        (out / "items.jsonl").write_text("\n".join(lines[:5]) + "\n")
        assert run_eval(proxy, out, *ARGS).returncode == 2          # no --resume: refuses
        r = run_eval(proxy, out, *ARGS, "--resume")
        assert r.returncode == 0, r.stderr
        doc2 = json.loads((out / "results.json").read_text())
        assert len(doc2["items"]) == 8
        assert [i["request_id"] for i in doc2["items"][:5]] == [i["request_id"] for i in doc["items"][:5]]
        assert {(i["id"], i["pass"]) for i in doc2["items"]} == {(i["id"], i["pass"]) for i in doc["items"]}

        # a wrong lookup token is bad input, before any request
        r = subprocess.run([sys.executable, "-m", "edge_eval", "eval", "--endpoint", proxy.url,
                            "--task", "rag", "--limit", "2", "--out", str(tmp_path / "bad"),
                            "--lookup-url", proxy.metrics_url, "--lookup-token", "wrong", "--quiet"],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and "token" in r.stderr and "Traceback" not in r.stderr

    # the endpoint is gone: bounded retries, then exit 1 with the partial results on disk
    dead = f"http://127.0.0.1:{free_port()}"
    out3 = tmp_path / "dead"
    r = subprocess.run([sys.executable, "-m", "edge_eval", "eval", "--endpoint", dead, "--model", "x",
                        "--task", "rag", "--limit", "2", "--retries", "1", "--out", str(out3), "--quiet"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stderr
    assert "run failed" in r.stderr and "Traceback" not in r.stderr
    doc3 = json.loads((out3 / "results.json").read_text())
    assert doc3["status"] == "failed" and doc3["items"] == [] and doc3["error"]
