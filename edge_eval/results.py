"""The results files of ``edge-eval eval`` (schema 1; the contract is in docs/evaluation.md).

``OUT/items.jsonl`` gets one line per finished (item, pass), appended and flushed as it happens;
``OUT/results.json`` is rewritten atomically (temporary file + rename) after every item, so a
reader (the proxy, which reloads it live) never sees half a file and an interrupted run loses
nothing. ``--resume`` reads items.jsonl back and skips what is done.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from edge_eval.errors import UsageError
from edge_eval.stats import ci95, mean

SCHEMA = 1


def atomic_write_json(path: Path, data: Any) -> None:
    """Write JSON to ``path`` through a temporary file in the same directory and a rename."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=1, allow_nan=False, default=_nan_none)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with _suppress():
            os.unlink(tmp)
        raise


class _suppress:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> bool:
        return True


def _nan_none(o: Any) -> Any:
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _clean(v: float) -> float | None:
    return None if v is None or (isinstance(v, float) and (math.isnan(v) or math.isinf(v))) else v


def summarize(items: list[dict[str, Any]], score_name: str, passes: int) -> dict[str, Any]:
    """Summary over the scored items: per pass the mean score and mean joules per request; the
    run's means with 95% CIs over passes (over items when there is one pass);
    IPW = mean score / mean joules per request [1/J]."""
    ok = [i for i in items if not i.get("error")]
    scored = [i for i in ok if score_name in (i.get("scores") or {})]
    with_j = [i for i in ok if i.get("joules") is not None]
    per_pass = []
    for p in range(passes):
        s = [i["scores"][score_name] for i in scored if i["pass"] == p]
        j = [i["joules"] for i in with_j if i["pass"] == p]
        if s or j:
            per_pass.append({"pass": p, "mean_score": _clean(mean(s)), "n_scored": len(s),
                             "mean_joules_per_request": _clean(mean(j))})
    scores = [i["scores"][score_name] for i in scored]
    joules = [i["joules"] for i in with_j]
    if len([x for x in per_pass if x["mean_score"] is not None]) >= 2:
        s_ci = ci95([x["mean_score"] for x in per_pass if x["mean_score"] is not None])
        ci_over = "passes"
    else:
        s_ci, ci_over = ci95(scores), "items"
    pj = [x["mean_joules_per_request"] for x in per_pass if x["mean_joules_per_request"] is not None]
    j_ci = ci95(pj) if len(pj) >= 2 else ci95(joules)
    sources = sorted({i.get("joules_source") or "none" for i in with_j})
    m_s, m_j = mean(scores), mean(joules)
    names = sorted({k for i in scored for k in i["scores"]})
    return {
        "score_name": score_name,
        "mean_score": _clean(m_s),
        "score_ci95": [_clean(s_ci[0]), _clean(s_ci[1])],
        "mean_joules_per_request": _clean(m_j),
        "joules_ci95": [_clean(j_ci[0]), _clean(j_ci[1])],
        "joules_source": sources[0] if len(sources) == 1 else ("mixed" if sources else "none"),
        "ipw_per_joule": _clean(m_s / m_j) if joules and scores and m_j > 0 else None,
        "ci_over": ci_over,
        "n_items": len({i["id"] for i in items}),
        "n_requests": len(items),
        "n_scored": len(scored),
        "n_failed": len(items) - len(ok),
        "mean_output_tokens": _clean(mean([i["output_tokens"] for i in ok
                                           if i.get("output_tokens") is not None])),
        "mean_latency_seconds": _clean(mean([i["latency_seconds"] for i in ok
                                             if i.get("latency_seconds") is not None])),
        "scores": {n: _clean(mean([i["scores"][n] for i in ok if n in (i.get("scores") or {})]))
                   for n in names},
        "per_pass": per_pass,
    }


class ResultsWriter:
    """items.jsonl (append) + results.json (atomic rewrite) under ``out``."""

    def __init__(self, out: Path, header: dict[str, Any], resume: bool) -> None:
        self.out = out
        self.items_path = out / "items.jsonl"
        self.results_path = out / "results.json"
        self.header = dict(header)
        self.items: list[dict[str, Any]] = []
        out.mkdir(parents=True, exist_ok=True)
        if self.items_path.exists() and self.items_path.stat().st_size > 0:
            if not resume:
                raise UsageError(f"{out} already holds results: pass --resume to continue, "
                                 "or choose another --out")
            self._load_previous()
        self.header.setdefault("started_at", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
        self._fh = open(self.items_path, "a", encoding="utf-8")

    def _load_previous(self) -> None:
        if self.results_path.exists():
            try:
                prev = json.loads(self.results_path.read_text())
            except (OSError, json.JSONDecodeError):
                prev = {}
            for key in ("task", "data", "endpoint", "passes", "limit", "seed"):
                if key in prev and prev[key] != self.header.get(key):
                    raise UsageError(f"--resume: {key} differs from the run in {self.out} "
                                     f"({prev[key]!r} there, {self.header.get(key)!r} now)")
            if prev.get("started_at"):
                self.header["started_at"] = prev["started_at"]
        for n, line in enumerate(self.items_path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:        # a line cut by a crash: dropped, redone
                continue
            if not rec.get("error"):
                self.items.append(rec)

    def done(self) -> set[tuple[str, int]]:
        return {(i["id"], i["pass"]) for i in self.items if not i.get("error")}

    def add(self, item: dict[str, Any]) -> None:
        self._fh.write(json.dumps(item, allow_nan=False) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self.items.append(item)

    def write(self, status: str, error: str | None = None, **extra: Any) -> dict[str, Any]:
        doc = {"schema": SCHEMA, **self.header, **extra, "status": status, "error": error,
               "updated_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "summary": summarize(self.items, self.header["score_name"], self.header["passes"]),
               "items": self.items}
        atomic_write_json(self.results_path, doc)
        return doc

    def close(self) -> None:
        self._fh.close()
