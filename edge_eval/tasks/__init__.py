"""The paper's three tasks (rag, summarization, chat) and their data sources."""
from __future__ import annotations

from edge_eval.errors import UsageError
from edge_eval.tasks.base import Item, TaskSpec
from edge_eval.tasks.chat import CHAT
from edge_eval.tasks.data import load_items
from edge_eval.tasks.rag import RAG
from edge_eval.tasks.summarization import SUMMARIZATION

TASKS: dict[str, TaskSpec] = {t.name: t for t in (RAG, SUMMARIZATION, CHAT)}


def get_task(name: str) -> TaskSpec:
    try:
        return TASKS[name]
    except KeyError:
        raise UsageError(f"unknown task {name!r} (known: {', '.join(TASKS)})") from None


__all__ = ["TASKS", "Item", "TaskSpec", "get_task", "load_items"]
