"""RAG task: answer a question from a given context (the paper's SQuAD reading comprehension).

Record schema (JSONL/Parquet/hub): ``context`` (str), ``question`` (str), ``answers`` (list of
str, or SQuAD's ``{"text": [...]}``; ``answer`` (str) is accepted too), optional ``id``.
Scores: token F1 and exact match against the best gold answer; NLI entailment of the answer by
the context when ``--nli-model`` is given (the paper's primary rag score).
"""
from __future__ import annotations

from typing import Any

from edge_eval.errors import UsageError
from edge_eval.tasks.base import Item, Messages, TaskSpec, require_str

SYSTEM = ("Answer the question using only the provided context. If the context does not contain "
          "the answer, say \"I do not have enough information.\"")


def _messages(item: Item) -> Messages:
    f = item.fields
    return [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": f"### Context\n{f['context']}\n\n### Question\n{f['question']}"}]


def _answers(rec: dict[str, Any], where: str) -> list[str]:
    a = rec.get("answers", rec.get("answer"))
    if isinstance(a, dict):                  # SQuAD: {"text": [...], "answer_start": [...]}
        a = a.get("text")
    if isinstance(a, str):
        a = [a]
    if not isinstance(a, list) or not a or not all(isinstance(x, str) for x in a):
        raise UsageError(f"{where}: field 'answers' must be a non-empty list of strings")
    return list(a)


def _from_record(rec: dict[str, Any], where: str) -> Item:
    return Item(id="", fields={"context": require_str(rec, "context", where),
                               "question": require_str(rec, "question", where),
                               "answers": _answers(rec, where)})


def _target(item: Item) -> str:
    return str(item.fields["answers"][0])


RAG = TaskSpec(name="rag", system_prompt=SYSTEM, primary_score="f1",
               scorers=("f1", "exact_match"), max_tokens=32, temperature=0.0,
               hf_default_split="validation", build_messages=_messages, target=_target,
               from_record=_from_record)
