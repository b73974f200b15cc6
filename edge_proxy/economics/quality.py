"""Quality scores for intelligence per joule and quantization fidelity.

Three places a score can come from:

- ``static``: configured per model (``economics.scores``), e.g. an offline evaluation's accuracy;
- ``feedback``: ``POST /edge/feedback {"request_id": ..., "score": 0..1}`` for a recent request;
- ``probe``: golden prompts (JSONL) sent through the proxy and checked (exact / contains / regex).

Scores are normalised to 0..1. Quantization fidelity compares a model's score with a reference
(FP16) score: from ``economics.scores`` / ``economics.reference_scores``, or evaluation results
files (``economics.quality_results_path``), which :mod:`edge_proxy.economics.quality_results` reads live
(``load_quality_results`` below reads the older ``{model: {score, reference_score}}`` file).
"""
from __future__ import annotations

import json
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from edge_proxy.config import ConfigError

Checker = Literal["exact", "contains", "regex"]


@dataclass(frozen=True)
class GoldenPrompt:
    """One probe: a prompt and how to check the completion."""

    id: str
    prompt: str
    expected: str
    checker: Checker = "contains"
    max_tokens: int = 16
    model: str | None = None

    def check(self, completion: str) -> bool:
        """True when the completion passes: ``exact`` (after stripping whitespace), ``contains``
        (substring, case-sensitive) or ``regex`` (``re.search``)."""
        if self.checker == "exact":
            return completion.strip() == self.expected.strip()
        if self.checker == "contains":
            return self.expected in completion
        return re.search(self.expected, completion) is not None


def load_golden_prompts(path: str | Path) -> list[GoldenPrompt]:
    """Read golden prompts from JSONL: one object per line with ``prompt``, ``expected``, optional
    ``id``, ``checker`` (exact|contains|regex, default contains), ``max_tokens`` (default 16),
    ``model``. Blank lines and lines starting with ``#`` are skipped. Raises ConfigError."""
    p = Path(path)
    try:
        lines = p.read_text().splitlines()
    except OSError as exc:
        raise ConfigError(f"probes file {p}: {exc.strerror or exc}") from None
    out: list[GoldenPrompt] = []
    for i, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"probes file {p} line {i}: not JSON ({exc.msg})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str) or not isinstance(
            obj.get("expected"), str
        ):
            raise ConfigError(f"probes file {p} line {i}: needs string fields prompt and expected")
        checker = obj.get("checker", "contains")
        if checker not in ("exact", "contains", "regex"):
            raise ConfigError(f"probes file {p} line {i}: checker must be exact, contains or regex")
        if checker == "regex":
            try:
                re.compile(obj["expected"])
            except re.error as exc:
                raise ConfigError(f"probes file {p} line {i}: bad regex ({exc})") from None
        try:
            max_tokens = int(obj.get("max_tokens", 16))
        except (TypeError, ValueError):
            raise ConfigError(f"probes file {p} line {i}: max_tokens must be an integer") from None
        out.append(
            GoldenPrompt(
                id=str(obj.get("id", i)),
                prompt=obj["prompt"],
                expected=obj["expected"],
                checker=checker,
                max_tokens=max_tokens,
                model=obj.get("model"),
            )
        )
    if not out:
        raise ConfigError(f"probes file {p}: no golden prompts")
    return out


@dataclass(frozen=True)
class RecentRequest:
    model: str
    joules: float | None


class RecentRequests:
    """Bounded map request_id -> (model, joules) of recent user requests, for feedback.

    Oldest entries are dropped beyond ``capacity``; never holds prompt or completion text.
    """

    def __init__(self, capacity: int = 10000) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, RecentRequest] = OrderedDict()
        self._scored: OrderedDict[str, None] = OrderedDict()   # ids whose feedback was taken

    def add(self, request_id: str, model: str, joules: float | None) -> None:
        self._items[request_id] = RecentRequest(model, joules)
        self._items.move_to_end(request_id)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def get(self, request_id: str) -> RecentRequest | None:
        return self._items.get(request_id)

    def claim_feedback(self, request_id: str) -> bool:
        """True the first time feedback for ``request_id`` is taken, False after (bounded memory:
        the ``capacity`` most recent claims)."""
        if request_id in self._scored:
            return False
        self._scored[request_id] = None
        while len(self._scored) > self.capacity:
            self._scored.popitem(last=False)
        return True

    def __len__(self) -> int:
        return len(self._items)


def load_quality_results(path: str | Path) -> dict[str, tuple[float, float | None]]:
    """Evaluation results file (JSON): ``{"model": {"score": s, "reference_score": r}, ...}``
    (``reference_score`` optional). Returns model -> (score, reference or None)."""
    p = Path(path)
    try:
        data: Any = json.loads(p.read_text())
    except OSError as exc:
        raise ConfigError(f"quality results {p}: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"quality results {p}: not JSON ({exc.msg})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"quality results {p}: top level must be an object keyed by model")
    out: dict[str, tuple[float, float | None]] = {}
    for model, entry in data.items():
        try:
            score = float(entry["score"])
            ref = entry.get("reference_score")
            out[str(model)] = (score, None if ref is None else float(ref))
        except (TypeError, KeyError, ValueError, AttributeError):
            raise ConfigError(
                f"quality results {p}: entry {model!r} needs a numeric score"
            ) from None
    return out
