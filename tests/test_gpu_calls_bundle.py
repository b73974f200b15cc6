"""benchmarks/gpu_calls.sh's epilogue: the device tool brings back at most 8 files from $OUT, so past 8 everything
is bundled into $OUT/all.tgz (logs kept beside it while they fit) and nothing is lost to the count."""
from __future__ import annotations

import subprocess
import tarfile
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_calls.sh"


def _run_bundle(out: Path) -> str:
    body = SCRIPT.read_text()
    start = body.index("bundle_out() {")
    fn = body[start:body.index("\n}\n", start) + 3]
    res = subprocess.run(["bash", "-c", f'set -u; out="$1"\n{fn}\nbundle_out', "bash", str(out)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    return res.stdout


def _files(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())


def test_more_than_eight_files_are_bundled_whole(tmp_path: Path) -> None:
    names = ["card.txt", "steady_state.log", "mma.log", "ss/steady_state.json", "ss_b/steady_state.json",
             "mma/int4_mma.json", "mma/int4_mma.md", "dp/decode_profile.json", "dp.log", "smoke.log", "x.log"]
    for i, n in enumerate(names):
        (tmp_path / n).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / n).write_text(f"content {i}\n")
    assert "bundled into all.tgz" in _run_bundle(tmp_path)
    left = _files(tmp_path)
    assert "all.tgz" in left and len(left) <= 8
    with tarfile.open(tmp_path / "all.tgz") as tar:
        inside = {m.name.removeprefix("./"): tar.extractfile(m).read().decode() for m in tar.getmembers() if m.isfile()}
    assert inside == {n: f"content {i}\n" for i, n in enumerate(names)}       # every file, whole


def test_eight_or_fewer_stay_as_they_are(tmp_path: Path) -> None:
    for n in ("card.txt", "a.log", "ss/steady_state.json"):
        (tmp_path / n).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / n).write_text(n)
    assert _run_bundle(tmp_path) == ""
    assert _files(tmp_path) == ["a.log", "card.txt", "ss/steady_state.json"]
