"""Evaluation and adaptation results read live from files ``edge-eval`` writes.

* ``economics.quality_results_path``: an ``edge-eval eval`` ``results.json`` (schema 1), or a
  directory searched for ``results.json`` files (one per run). Each run gives its model (the
  proxy's label for it) a measured score: ``summary.mean_score``. Several runs of one model: the
  most recently written file wins. The older ``{"model": {"score": s, "reference_score": r}}``
  file is still read (its scores count as configured).
* Q_ret of a model: its run against the run of its reference model (``economics.reference_models``
  ``{model: reference}``, else the run's own ``reference_model``), on the items both evaluated:
  ``100 x mean(score of model) / mean(score of reference)`` over the common (id, pass) pairs.
* ``economics.adaptation_results_path``: ``edge-eval adapt``'s ``adaptation.json``; its
  ``joules`` (training, plus merge and quantize when recorded) are C_train, with its energy source.

Files are re-read when their modification time or size changes (checked at most once a second);
a file that cannot be parsed keeps the last good values and logs a warning once per change.
Sources: ``measured`` for evaluated scores; the adaptation's own ``energy_source`` class
(``measured`` on NVML, ``estimated`` on CPU).
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from prometheus_client.core import GaugeMetricFamily

log = logging.getLogger("edge_proxy.quality_results")
CHECK_INTERVAL_SECONDS = 1.0


@dataclass(frozen=True)
class EvalRun:
    model: str
    score: float
    source: str                                   # measured | configured
    task: str = ""
    mean_joules: float | None = None
    joules_source: str = "none"
    reference_model: str | None = None
    reference_score: float | None = None          # legacy file only
    item_scores: dict[tuple[str, int], float] = field(default_factory=dict)
    mtime_ns: int = 0


@dataclass(frozen=True)
class Adaptation:
    joules: float
    source: str                                   # measured | estimated
    usd: float | None = None


def parse_results(data: Any, mtime_ns: int = 0) -> list[EvalRun]:
    """Runs from one file's JSON (schema 1 results.json, or the legacy {model: {score}} map)."""
    if isinstance(data, dict) and data.get("schema") == 1 and "summary" in data:
        s = data["summary"]
        name = s.get("score_name")
        score = s.get("mean_score")
        if not isinstance(score, (int, float)) or not data.get("model"):
            return []
        items = {(str(i["id"]), int(i["pass"])): float(i["scores"][name])
                 for i in data.get("items", []) if not i.get("error")
                 and isinstance((i.get("scores") or {}).get(name), (int, float))}
        return [EvalRun(model=str(data["model"]), score=float(score), source="measured",
                        task=str(data.get("task", "")), mean_joules=s.get("mean_joules_per_request"),
                        joules_source=str(s.get("joules_source", "none")),
                        reference_model=data.get("reference_model"), item_scores=items,
                        mtime_ns=mtime_ns)]
    if isinstance(data, dict):
        out = []
        for model, entry in data.items():
            if isinstance(entry, dict) and isinstance(entry.get("score"), (int, float)):
                ref = entry.get("reference_score")
                out.append(EvalRun(model=str(model), score=float(entry["score"]), source="configured",
                                   reference_score=float(ref) if isinstance(ref, (int, float)) else None,
                                   mtime_ns=mtime_ns))
        return out
    return []


def paired_fidelity(run: EvalRun, ref: EvalRun) -> float:
    """Q_ret [%] = 100 x mean(run scores) / mean(reference scores) over the (item, pass) pairs
    both runs scored; without common pairs, the ratio of the two means. NaN when the reference
    score is 0."""
    common = sorted(set(run.item_scores) & set(ref.item_scores))
    if common:
        num = math.fsum(run.item_scores[k] for k in common)
        den = math.fsum(ref.item_scores[k] for k in common)
    else:
        num, den = run.score, ref.score
    return 100.0 * num / den if den > 0 else math.nan


class ResultsFiles:
    """The live view of the configured results files."""

    def __init__(self, quality_path: str | None, adaptation_path: str | None,
                 reference_models: dict[str, str] | None = None) -> None:
        self.quality_path = Path(quality_path) if quality_path else None
        self.adaptation_path = Path(adaptation_path) if adaptation_path else None
        self.reference_models = dict(reference_models or {})
        self.runs: dict[str, EvalRun] = {}
        self.adaptation: Adaptation | None = None
        self._seen: dict[Path, tuple[int, int]] = {}
        self._by_file: dict[Path, list[EvalRun]] = {}
        self._checked = -math.inf
        self.refresh(force=True)

    def _files(self) -> list[Path]:
        p = self.quality_path
        if p is None:
            return []
        if p.is_dir():
            return sorted(p.rglob("results.json"))
        return [p]

    def _changed(self, path: Path) -> tuple[bool, int]:
        try:
            st = path.stat()
        except OSError:
            return (path in self._seen, 0)
        key = (st.st_mtime_ns, st.st_size)
        return (self._seen.get(path) != key, st.st_mtime_ns)

    def _read(self, path: Path) -> Any:
        return json.loads(path.read_text(encoding="utf-8"))

    def refresh(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._checked < CHECK_INTERVAL_SECONDS:
            return
        self._checked = now
        files = self._files()
        dirty = False
        for path in files:
            changed, mtime = self._changed(path)
            if not changed:
                continue
            try:
                runs = parse_results(self._read(path), mtime)
                st = path.stat()
            except (OSError, ValueError) as exc:
                log.warning("quality results %s unreadable, keeping the last good values: %s",
                            path, exc)
                try:
                    st = path.stat()
                    self._seen[path] = (st.st_mtime_ns, st.st_size)
                except OSError:
                    pass
                continue
            self._seen[path] = (st.st_mtime_ns, st.st_size)
            self._by_file[path] = runs
            dirty = True
        for gone in set(self._by_file) - set(files):
            del self._by_file[gone]
            self._seen.pop(gone, None)
            dirty = True
        if dirty:
            runs: dict[str, EvalRun] = {}
            for lst in self._by_file.values():
                for r in lst:
                    if r.model not in runs or r.mtime_ns >= runs[r.model].mtime_ns:
                        runs[r.model] = r
            self.runs = runs
        self._refresh_adaptation()

    def _refresh_adaptation(self) -> None:
        p = self.adaptation_path
        if p is None:
            return
        changed, _ = self._changed(p)
        if not changed:
            return
        try:
            data = self._read(p)
            st = p.stat()
            self._seen[p] = (st.st_mtime_ns, st.st_size)
            joules = float(data["total_joules"] if "total_joules" in data else data["joules"])
            src = str(data.get("energy_source_class") or data.get("energy_source") or "none")
            self.adaptation = Adaptation(joules, "measured" if src in ("nvml", "measured") else
                                         "estimated" if src == "estimated" else src,
                                         data.get("usd"))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("adaptation results %s unreadable, keeping the last good values: %s", p, exc)

    # ------------------------------------------------------------------ queries
    def score(self, model: str) -> tuple[float, str] | None:
        r = self.runs.get(model)
        return (r.score, r.source) if r else None

    def reference_of(self, model: str) -> str | None:
        r = self.runs.get(model)
        return self.reference_models.get(model) or (r.reference_model if r else None)

    def fidelity(self, model: str) -> tuple[float, str] | None:
        """Q_ret [%] and its source, or None when this file set does not give one."""
        run = self.runs.get(model)
        if run is None:
            return None
        if run.reference_score is not None:        # legacy file: configured values
            return (100.0 * run.score / run.reference_score if run.reference_score > 0
                    else math.nan, "configured")
        ref_name = self.reference_of(model)
        ref = self.runs.get(ref_name) if ref_name else None
        if ref is None:
            return None
        src = "measured" if run.source == ref.source == "measured" else "configured"
        return paired_fidelity(run, ref), src


# ---------------------------------------------------------------------- source-labelled gauges
def intelligence_per_joule_source(o: Any, model: str) -> str:
    """The score's source, or the energy source's when the score is measured but the joules are
    estimated (or replayed)."""
    _, src = o.score(model)
    esrc = getattr(o.energy_component, "source", None)
    return esrc if src == "measured" and esrc in ("estimated", "replay") else src


def break_even_source(o: Any, model: str) -> str:
    """Where C_train comes from: the adaptation results file's energy source class (measured |
    estimated), else configured."""
    a = o.results_files.adaptation
    return a.source if a is not None else "configured"


def sourced_gauges(o: Any, models: list[str]) -> Iterable[GaugeMetricFamily]:
    """N_break, IPW and Q_ret with a ``source`` label: measured (evaluation / adaptation results
    files, NVML), estimated (CPU-estimated energy), configured, or none."""
    fams = [
        ("edge_proxy_break_even_requests", "N_break over the window: fixed cost / (API cost per "
         "request - local cost per request); +Inf when the API is not dearer. source: of C_train.",
         lambda m: (o.break_even_requests(m), break_even_source(o, m))),
        ("edge_proxy_intelligence_per_joule", "IPW: quality score / mean joules per request over "
         "the window [1/J]. source: of the score (estimated when the joules are).",
         lambda m: (o.intelligence_per_joule(m), intelligence_per_joule_source(o, m))),
        ("edge_proxy_quantization_fidelity_percent", "Q_ret: score / reference (FP16) score x 100 "
         "(evaluated: over the items both variants answered).", o.quantization_fidelity_sourced),
    ]
    for name, doc, fn in fams:
        g = GaugeMetricFamily(name, doc, labels=["model", "source"])
        for m in models:
            try:
                value, src = fn(m)
                g.add_metric([m, src], float(value))
            except Exception:               # never fail a scrape
                g.add_metric([m, "none"], math.nan)
        yield g
