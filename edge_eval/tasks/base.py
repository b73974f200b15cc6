"""What a task is: items, how an item becomes chat messages, the training target, the scorers.

An :class:`Item` is one evaluation (or training) example: an ``id`` and the task's fields. A
:class:`TaskSpec` turns it into OpenAI chat messages (the paper's system prompt and its
"### Context / ### Question" or "### Article" user turn, EDGE-EVAL, ACL 2026 Industry Track, §2),
names the reference text a scorer compares with, and the target text ``adapt`` trains on.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

Messages = list[dict[str, str]]


@dataclass(frozen=True)
class Item:
    id: str
    fields: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TaskSpec:
    """One of the paper's three tasks."""

    name: str
    system_prompt: str
    primary_score: str                       # the score used for IPW and Q_ret
    scorers: tuple[str, ...]                 # scorers run by default
    max_tokens: int
    temperature: float
    hf_default_split: str
    build_messages: Callable[[Item], Messages]
    target: Callable[[Item], str | None]     # training target (None: the item cannot train)
    from_record: Callable[[dict[str, Any], str], Item]   # validate one data record (where: for errors)

    def messages(self, item: Item) -> Messages:
        return self.build_messages(item)


def require_str(rec: dict[str, Any], key: str, where: str) -> str:
    from edge_eval.errors import UsageError

    v = rec.get(key)
    if not isinstance(v, str) or not v.strip():
        raise UsageError(f"{where}: field {key!r} must be a non-empty string")
    return v


def record_id(rec: dict[str, Any], index: int) -> str:
    for key in ("id", "prompt_id"):
        if rec.get(key) not in (None, ""):
            return str(rec[key])
    return str(index)
