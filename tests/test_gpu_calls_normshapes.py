"""benchmarks/gpu_calls.sh's ``normshapes`` mode (the two opt-in fast-engine switches together against the defaults),
run with stand-ins for python3 and nvidia-smi that record each call and the switches it saw; and that a call makes
its $OUT when that folder does not exist yet (2026-12-07: a call into a missing subfolder lost its raw files)."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_calls.sh"

STUB = """#!/usr/bin/env bash
echo "${MODEL_SERVER_FAST_COMPILE_SHAPES:-unset},${MODEL_SERVER_FAST_NORM:-unset}|$*" >> "$CALLS"
case "$*" in
  *steady_state.py*) echo "int4:mma c= 64   1.0 tok/s [1.0..1.0] stub" ;;
  *decode_profile.py*) echo "| int4 | served | stub |" ;;
  *dp_greedy_compare.py*) echo "stub compare" ;;
esac
exit 0
"""


def _run(tmp_path: Path, out: Path, **env: str) -> tuple[subprocess.CompletedProcess, list[tuple[str, str]]]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("python3", STUB), ("nvidia-smi", "#!/usr/bin/env bash\necho stub card\n")):
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    calls = tmp_path / "calls.txt"
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MODEL_SERVER_", "NS_"))}
    r = subprocess.run(["bash", str(SCRIPT), "normshapes"], cwd=tmp_path,
                       env={**base, "PATH": f"{bin_dir}:{base['PATH']}", "OUT": str(out), "CALLS": str(calls),
                            "EDGE_EVAL_COMMIT": "c0ffee", **env}, capture_output=True, text=True, timeout=60)
    lines = [tuple(line.split("|", 1)) for line in calls.read_text().splitlines()]
    return r, [(e, a) for e, a in lines if "pip install" not in a and "model_server synth" not in a]


def test_steady_state_each_way_in_order_then_profiles_compared(tmp_path: Path) -> None:
    out = tmp_path / "OUT" / "sub"                                  # not made beforehand: the script makes it
    r, calls = _run(tmp_path, out)
    assert r.returncode == 0, r.stderr
    assert (out / "card.txt").read_text().startswith("stub card")
    scripts = [a.split()[0] for _, a in calls]
    assert scripts == ["benchmarks/steady_state.py"] * 2 + ["benchmarks/decode_profile.py"] * 2 + \
        ["benchmarks/dp_greedy_compare.py"]
    on, off = "rows,triton", "dynamic,compiled"
    assert [e for e, _ in calls] == [on, off, off, on, off]
    assert f"--out {out}/ss_on " in calls[0][1] and f"--out {out}/ss_off " in calls[1][1]
    for _, a in calls[:2]:
        assert "--quants int4:mma,bf16 --concurrency 64 --http-concurrency" in a and "--commit c0ffee" in a
    assert f"--out {out}/dp_off " in calls[2][1] and f"--out {out}/dp_on " in calls[3][1]
    assert "--batches 64 --variants served --batch-greedy 64" in calls[3][1]
    assert calls[4][1].endswith(f"{out}/dp_off/decode_profile.json {out}/dp_on/decode_profile.json")
    assert "steady_state (ss_on) rc 0" in r.stdout and "steady_state (ss_off) rc 0" in r.stdout


def test_the_other_order_and_no_profiles(tmp_path: Path) -> None:
    r, calls = _run(tmp_path, tmp_path / "OUT", NS_ORDER="off,on", NS_DP="0", NS_CONC="8,64")
    assert r.returncode == 0, r.stderr
    assert [(e, a.split("--out ")[1].split()[0].rsplit("/", 1)[1]) for e, a in calls] == [
        ("dynamic,compiled", "ss_off"), ("rows,triton", "ss_on")]
    assert all("--concurrency 8,64 " in a for _, a in calls)
