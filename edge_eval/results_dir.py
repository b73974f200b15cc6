"""The layout of a bench results directory, and reading one back (also when half-written).

``edge-eval bench`` writes, under ``RESULTS_DIR``:

- ``grid.json``: the validated grid (variants planned, in order);
- ``variants.jsonl``: one JSON object a line per finished variant attempt (``status`` ok|failed,
  ``error``, ``measurements``: the measurements-table columns of docs/metrics.md, ``sweep``: a list
  of ``{"concurrency", "requests", "seconds", "output_tokens", "energy_joules",
  "joules_per_output_token", "tokens_per_second"}``);
- ``requests.jsonl``: raw per-request rows (variant, phase, pass, latency, tokens, joules);
- ``eval/<variant>/``: the ``edge-eval eval`` results of each variant.

``edge-eval report`` also takes a directory that holds just a ``measurements.csv`` (e.g. the
paper's table). The last record of a variant wins (``--resume`` re-runs failed ones).
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

GRID_FILE = "grid.json"
VARIANTS_FILE = "variants.jsonl"
REQUESTS_FILE = "requests.jsonl"
MEASUREMENTS_FILE = "measurements.csv"


@dataclass
class ResultsDir:
    """What a results directory holds: finished rows, failures, and what is missing."""

    rows: list[dict[str, str]] = field(default_factory=list)      # measurements rows, as text
    header: list[str] = field(default_factory=list)
    sweeps: dict[str, list[dict[str, float]]] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)            # variant -> error
    missing: list[str] = field(default_factory=list)                # planned, no record
    notes: list[str] = field(default_factory=list)                  # what was unreadable


def _text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)
    return str(value)


def read_records(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """JSONL records; a torn or bad line is skipped and named in the notes."""
    records: list[dict[str, Any]] = []
    notes: list[str] = []
    if not path.exists():
        return records, notes
    for i, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            notes.append(f"{path.name} line {i}: not valid JSON (a write cut short?); skipped")
            continue
        if isinstance(rec, dict) and rec.get("variant"):
            records.append(rec)
        else:
            notes.append(f"{path.name} line {i}: not a variant record; skipped")
    return records, notes


def planned_variants(root: Path) -> list[str]:
    try:
        grid = json.loads((root / GRID_FILE).read_text(encoding="utf-8"))
        return [str(v["name"]) for v in grid.get("variants", [])]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return []


def load(root: Path) -> ResultsDir:
    """Read ``root``: variants.jsonl (preferred) or measurements.csv."""
    out = ResultsDir()
    planned = planned_variants(root)
    if (root / GRID_FILE).exists() and not planned:
        out.notes.append(f"{GRID_FILE}: unreadable; cannot say which variants are missing")
    records, notes = read_records(root / VARIANTS_FILE)
    out.notes.extend(notes)
    latest: dict[str, dict[str, Any]] = {}
    for rec in records:
        latest[str(rec["variant"])] = rec
    order = planned + sorted(v for v in latest if v not in planned)
    columns: list[str] = []
    for name in order:
        rec = latest.get(name)
        if rec is None:
            out.missing.append(name)
            continue
        if rec.get("status") != "ok":
            out.failed[name] = str(rec.get("error") or "failed (no error recorded)")
            continue
        meas = {k: _text(v) for k, v in (rec.get("measurements") or {}).items()}
        meas["variant"] = name
        for k in meas:
            if k not in columns:
                columns.append(k)
        out.rows.append(meas)
        sweep = [s for s in rec.get("sweep") or [] if isinstance(s, dict)]
        if sweep:
            out.sweeps[name] = sweep
    if not records and (root / MEASUREMENTS_FILE).exists():
        with open(root / MEASUREMENTS_FILE, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            columns = list(reader.fieldnames or [])
            out.rows = [dict(r) for r in reader]
    out.header = (["variant"] + [c for c in columns if c != "variant"]) if columns else []
    if not records and not out.rows:
        out.notes.append(f"no {VARIANTS_FILE} and no {MEASUREMENTS_FILE}: nothing measured yet")
    return out
