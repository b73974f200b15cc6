"""Every ``MODEL_SERVER_*`` environment switch the model server reads is named in the docs (docs/*.md or README.md),
so a user can find what it does and its default."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SWITCH = re.compile(r"""["'](MODEL_SERVER_[A-Z0-9_]+)["']""")


def switches_in_code() -> set[str]:
    return {m.group(1) for path in (ROOT / "model_server").rglob("*.py") for m in SWITCH.finditer(path.read_text())}


def test_every_switch_the_code_reads_is_in_the_docs():
    names = switches_in_code()
    assert len(names) > 30                      # the scan finds the switches (43 when this test was written)
    docs = "\n".join(p.read_text() for p in [*(ROOT / "docs").glob("*.md"), ROOT / "README.md"])
    missing = sorted(n for n in names if not re.search(rf"\b{n}\b", docs))
    assert not missing, f"switches read by model_server/ but named nowhere in docs/ or README.md: {missing}"
