"""Summarization task: a one-sentence news-style summary of an article (the paper's XSum task).

Record schema: ``document`` (str), ``summary`` (str, the reference), optional ``id``.
Scores: ROUGE-L F-measure against the reference (``rouge-score``); NLI non-contradiction of the
summary by the document when ``--nli-model`` is given (the paper's primary summarization score).
"""
from __future__ import annotations

from typing import Any

from edge_eval.tasks.base import Item, Messages, TaskSpec, require_str

SYSTEM = ("Summarize the article in one news-style lead sentence. Do not add facts that are not "
          "in the article.")


def _messages(item: Item) -> Messages:
    return [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": f"### Article\n{item.fields['document']}"}]


def _from_record(rec: dict[str, Any], where: str) -> Item:
    return Item(id="", fields={"document": require_str(rec, "document", where),
                               "summary": require_str(rec, "summary", where)})


def _target(item: Item) -> str:
    return str(item.fields["summary"])


SUMMARIZATION = TaskSpec(name="summarization", system_prompt=SYSTEM, primary_score="rouge_l",
                         scorers=("rouge_l",), max_tokens=64, temperature=0.0,
                         hf_default_split="validation", build_messages=_messages,
                         target=_target, from_record=_from_record)
