"""ROUGE-L F-measure through ``rouge-score`` (stemming on), the paper's summarization metric."""
from __future__ import annotations

from functools import lru_cache
from typing import Any

from edge_eval.errors import missing_package


@lru_cache(maxsize=1)
def _scorer() -> Any:
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        raise missing_package("rouge-score") from None
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def check_available() -> None:
    _scorer()


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure in 0..1 (longest common subsequence of tokens)."""
    return float(_scorer().score(reference, prediction)["rougeL"].fmeasure)
