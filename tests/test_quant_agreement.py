"""``benchmarks/quant_agreement.py`` on CPU, a few training steps: the generated tasks are what they claim, and the
report compares every 4-bit format with bf16 (and INT4 with NF4) on the same held-out prompts."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from quant_agreement import answers_agree, eval_items, world  # noqa: E402


def test_items_are_right_and_held_out():
    facts = world(0)
    items, held = eval_items(facts, 30, 0)
    assert [t for t, _, _ in items[:3]] == ["facts", "counting", "sums"] and len(items) == 30
    for task, prompt, answer in items:
        if task == "facts":
            assert answer == f" {facts[prompt.split()[3]][0]}."
        elif task == "counting":
            nums = [int(x) for x in prompt.split()[1:]]
            assert answer == f" {nums[-1] + 1} {nums[-1] + 2}"
        else:
            a, _, b, _ = prompt.split()
            assert (int(a), int(b)) in held and answer == f" {int(a) + int(b)}."


def test_smoke(tmp_path):
    out = tmp_path / "qa"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "quant_agreement.py"), "--out", str(out),
                           "--steps", "15", "--eval", "6", "--new-tokens", "6", "--commit", "abc1234",
                           "--quants", "bf16,bf16-attn,int4,nf4"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads((out / "quant_agreement.json").read_text())
    assert r["commit"] == "abc1234" and r["train"]["steps"] == 15 and r["train"]["last_loss"] < r["train"]["first_loss"]
    f = r["formats"]
    assert set(f) == {"bf16", "bf16-attn", "int4", "nf4"} and f["int4"]["weight_bytes"] < f["bf16"]["weight_bytes"]
    # the reference decodes with SDPA, bf16-attn with the Triton kernel (its interpreter here), the rest as served
    assert [f[q]["decode_attn_kernel"] for q in ("bf16", "bf16-attn", "int4")] == [False, True, False]
    for q in ("bf16-attn", "int4", "nf4"):
        v = f[q]["vs_bf16"]
        assert v["tokens"] == 36 and 0 <= v["free_running_match"] <= 1 and 0 <= v["teacher_forced_match"] <= 1
        assert 0 <= v["answers_identical"] <= 1 and set(v["answers_identical_by_task"]) == {"facts", "counting", "sums"}
        assert set(f[q]["accuracy"]) == {"facts", "counting", "sums"}
    assert f["int4"]["vs_nf4"]["tokens"] == 36 and "answers_identical" in f["int4"]["vs_nf4"]
    assert "| int4 |" in proc.stdout and "int4 vs nf4" in proc.stdout


def test_answers_agree_counts_only_the_answer_span():
    class Tok:
        def encode(self, text):
            class E:
                ids = list(range(len(text.split())))
            return E()
    items = [("facts", "p", " teal ."), ("sums", "p", " 7 .")]        # 2 answer tokens each
    assert answers_agree(items, Tok(), [[1, 2, 9], [4, 5]], [[1, 2, 3], [4, 6]]) == 0.5
    assert answers_agree(items, Tok(), [[1, 2, 9], [4, 5]], [[1, 2, 3], [4, 6]], "facts") == 1.0
    assert answers_agree(items, Tok(), [[1, 2, 9], [4, 5]], [[1, 2, 3], [4, 6]], "sums") == 0.0

