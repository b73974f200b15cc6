"""Scorers: token F1 / exact match (rag), ROUGE-L (summarization), NLI (optional, both), and the
LLM judge (chat). :func:`score_item` returns ``{score_name: value in 0..1}`` for one output; an
empty dict means unscored."""
from __future__ import annotations

from typing import Any

from edge_eval.errors import UsageError
from edge_eval.scoring.token import best_over, exact_match, token_f1
from edge_eval.tasks.base import Item

SCORERS = ("f1", "exact_match", "rouge_l", "nli", "judge")
SCORE_NAMES = {"f1": "f1", "exact_match": "exact_match", "rouge_l": "rouge_l",
               "nli": "nli", "judge": "judge_helpfulness"}


def check_scorers(task: str, names: list[str]) -> None:
    """Raise UsageError for an unknown scorer or one that does not fit the task."""
    fits = {"rag": {"f1", "exact_match", "rouge_l", "nli"},
            "summarization": {"rouge_l", "nli"}, "chat": {"judge", "rouge_l"}}
    for n in names:
        if n not in SCORERS:
            raise UsageError(f"unknown scorer {n!r} (known: {', '.join(SCORERS)})")
        if n not in fits[task]:
            raise UsageError(f"scorer {n!r} does not apply to task {task!r} "
                             f"(use: {', '.join(sorted(fits[task]))})")
    if "rouge_l" in names:
        from edge_eval.scoring.rouge import check_available
        check_available()


def score_text(task: str, names: list[str], item: Item, output: str, nli: Any = None) -> dict[str, float]:
    """Scores computed locally from the output text (the judge is asynchronous: see judge.py)."""
    f = item.fields
    out: dict[str, float] = {}
    for n in names:
        if n == "f1":
            out["f1"] = best_over(token_f1, output, f["answers"])
        elif n == "exact_match":
            out["exact_match"] = best_over(exact_match, output, f["answers"])
        elif n == "rouge_l":
            from edge_eval.scoring.rouge import rouge_l
            ref = f["answers"][0] if task == "rag" else f.get("summary") or f.get("reference")
            if ref:
                out["rouge_l"] = rouge_l(output, ref)
        elif n == "nli" and nli is not None:
            if task == "rag":
                out["nli"] = nli.entailment(f["context"], output)
            else:
                out["nli"] = nli.non_contradiction(f["document"], output)
    return out
