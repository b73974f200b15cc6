"""Chat task: a helpful, safe assistant turn (the paper's UltraChat task).

Record schema: ``messages`` (list of ``{"role", "content"}``); the conversation up to its last
user turn is the prompt and an assistant turn after it, if any, is the reference (UltraChat rows
end with the assistant's answer: the paper's inference used that answer as the prompt by mistake).
Optional ``id`` (or UltraChat's ``prompt_id``).
Scores: LLM-as-judge helpfulness and safety (1-10, normalised to 0..1) through an
OpenAI-compatible ``--judge-endpoint``; without one the items are left unscored, with a message.
"""
from __future__ import annotations

from typing import Any

from edge_eval.errors import UsageError
from edge_eval.tasks.base import Item, Messages, TaskSpec

SYSTEM = "You are a helpful and coherent AI assistant."
ROLES = ("system", "user", "assistant")


def _from_record(rec: dict[str, Any], where: str) -> Item:
    msgs = rec.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise UsageError(f"{where}: field 'messages' must be a non-empty list")
    clean: list[dict[str, str]] = []
    for m in msgs:
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise UsageError(f"{where}: each message needs role (system|user|assistant) and content")
        clean.append({"role": m["role"], "content": m["content"]})
    last_user = max((i for i, m in enumerate(clean) if m["role"] == "user"), default=None)
    if last_user is None:
        raise UsageError(f"{where}: 'messages' has no user turn")
    after = clean[last_user + 1:]
    reference = after[0]["content"] if after and after[0]["role"] == "assistant" else None
    return Item(id="", fields={"messages": clean[: last_user + 1], "reference": reference})


def _messages(item: Item) -> Messages:
    msgs = list(item.fields["messages"])
    if msgs[0]["role"] != "system":
        msgs.insert(0, {"role": "system", "content": SYSTEM})
    return msgs


def _target(item: Item) -> str | None:
    return item.fields.get("reference")


CHAT = TaskSpec(name="chat", system_prompt=SYSTEM, primary_score="judge_helpfulness",
                scorers=("judge",), max_tokens=128, temperature=0.7, hf_default_split="test_sft",
                build_messages=_messages, target=_target, from_record=_from_record)
