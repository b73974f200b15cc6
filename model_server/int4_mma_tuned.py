"""The CUDA W4A16 kernel's measured launch configurations (``data/int4_mma_tuned.json``) and how a step finds one.

A sweep (``benchmarks/int4_mma_bench.py``) times every configuration of the kernel on each layer shape and row
count on one card; ``benchmarks/int4_mma_tune.py`` writes each cell whose fastest correct configuration beats the
rule (:func:`model_server.int4_mma.rule_config` with FLAT) by a margin into the table, with its time, the rule's
and the result file it came from. Entries are keyed by the card's SM count (the H100 and H200 both have 132), the
layer's ``[n, k]``, the step's 8-token tiles and the rows the sweep ran: a step of ``m`` rows takes the entry of its
shape and tiles with the fewest measured rows >= ``m`` (else the most), so 2-8 rows take the 8-row winner and 1 row
its own. Shapes or cards the table lacks take the rule.

``MODEL_SERVER_INT4_MMA_CONFIGS``: ``tuned`` (default) or ``rule`` (the rule as served before the table: the A/B
baseline); read once per process, like the table.

Owns: reading the table and matching a step to an entry. Must NOT build or validate configurations, or hold the
rule (:mod:`model_server.int4_mma`'s).
"""
from __future__ import annotations

import json
import logging
import os
from functools import lru_cache
from pathlib import Path

from model_server.switches import SwitchValueError

log = logging.getLogger(__name__)

TABLE = Path(__file__).resolve().parent / "data" / "int4_mma_tuned.json"
FIELDS = ("nt", "r", "warps", "stages", "split", "flat", "kw")     # int4_mma.Config's fields, in order
MODES = ("tuned", "rule")
SWITCH = "MODEL_SERVER_INT4_MMA_CONFIGS"

Key = tuple[int, int, int, int]                  # (num_sms, n, k, nt)
Fields = tuple[int, ...]


@lru_cache(maxsize=None)
def mode() -> str:
    """``tuned`` or ``rule`` from ``MODEL_SERVER_INT4_MMA_CONFIGS`` (unset: ``tuned``); another value raises
    :class:`SwitchValueError`."""
    raw = os.environ.get(SWITCH, "").strip() or "tuned"
    if raw not in MODES:
        raise SwitchValueError(f"{SWITCH} must be one of {', '.join(MODES)}, got {raw!r}")
    return raw


def read(path: Path) -> dict[Key, list[tuple[int, Fields]]]:
    """The table at ``path`` by key, each key's entries sorted by measured rows. A missing or unreadable table, or an
    entry without every field, is one warning and left out (the rule serves), never an error."""
    try:
        data = json.loads(path.read_text())
        entries = data["configs"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("int4 mma: tuned configurations %s not read (%s); the rule picks every configuration", path,
                    " ".join(str(exc).split())[:200])
        return {}
    out: dict[Key, list[tuple[int, Fields]]] = {}
    bad = 0
    for entry in entries:
        try:
            fields = tuple(int(entry["config"][f]) for f in FIELDS)
            key = (int(entry["num_sms"]), int(entry["n"]), int(entry["k"]), fields[0])
            out.setdefault(key, []).append((int(entry["m"]), fields))
        except (KeyError, TypeError, ValueError):
            bad += 1
    if bad:
        log.warning("int4 mma: %d of %d tuned configurations in %s lack a field; the rule serves their shapes", bad,
                    len(entries), path)
    return {key: sorted(rows) for key, rows in out.items()}


@lru_cache(maxsize=None)
def _table() -> dict[Key, list[tuple[int, Fields]]]:
    return read(TABLE)


def match(rows: list[tuple[int, Fields]], m: int) -> Fields | None:
    """The entry for ``m`` rows among one key's ``(measured rows, fields)``, sorted: the fewest measured rows >= ``m``,
    else the most."""
    for measured, fields in rows:
        if measured >= m:
            return fields
    return rows[-1][1] if rows else None


def lookup(m: int, n: int, k: int, nt: int, num_sms: int) -> Fields | None:
    """The measured configuration's fields (``FIELDS``' order) for ``m`` rows (``nt`` 8-token tiles) of an ``[n, k]``
    layer on a card of ``num_sms`` SMs, or None where the table lacks it (the caller checks :func:`mode` first)."""
    return match(_table().get((num_sms, n, k, nt), []), m)


def reload() -> None:
    """Read the switch and the table again at the next lookup (tests, benchmarks that switch in one process)."""
    mode.cache_clear()
    _table.cache_clear()
