"""Data sources for a task: ``builtin:TASK[:SPLIT]``, ``hf:NAME[:SPLIT]`` (through ``datasets``),
or a local ``.jsonl`` / ``.json`` / ``.parquet`` file with the task's schema (see the task
modules and docs/evaluation.md). Bad input raises UsageError with one line."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

from edge_eval.errors import UsageError, missing_package
from edge_eval.tasks.base import Item, TaskSpec, record_id
from edge_eval.tasks.builtin import builtin_items

BUILTIN_DEFAULT_N = 200       # items generated when --limit is not given


def load_items(source: str, task: TaskSpec, limit: int | None = None, seed: int = 0,
               default_split: str = "test") -> list[Item]:
    """Items of ``task`` from ``source``, at most ``limit`` (in source order)."""
    if limit is not None and limit <= 0:
        raise UsageError("--limit must be > 0")
    if source.startswith("builtin"):
        parts = source.split(":")
        name = parts[1] if len(parts) > 1 and parts[1] else task.name
        split = parts[2] if len(parts) > 2 else default_split
        if name != task.name:
            raise UsageError(f"data {source!r} is for task {name!r}, not {task.name!r}")
        return builtin_items(name, split, limit or BUILTIN_DEFAULT_N, seed)
    if source.startswith("hf:"):
        records = _hub_records(source[3:], task, limit)
        where = source
    else:
        records = _file_records(Path(source), limit)
        where = source
    items: list[Item] = []
    seen: set[str] = set()
    for i, rec in enumerate(records):
        if not isinstance(rec, dict):
            raise UsageError(f"{where} record {i + 1}: not an object")
        item = task.from_record(rec, f"{where} record {i + 1}")
        rid = record_id(rec, i)
        if rid in seen:
            rid = f"{rid}#{i}"
        seen.add(rid)
        items.append(Item(id=rid, fields=item.fields))
        if limit is not None and len(items) >= limit:
            break
    if not items:
        raise UsageError(f"{where}: no records")
    return items


def _file_records(path: Path, limit: int | None) -> Iterable[dict[str, Any]]:
    if not path.is_file():
        raise UsageError(f"data file not found: {path} (or use builtin:TASK or hf:NAME)")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise missing_package("pyarrow") from None
        try:
            return pq.read_table(path).to_pylist()
        except Exception as exc:                          # noqa: BLE001 - one line for any bad file
            raise UsageError(f"cannot read parquet {path}: {exc}") from None
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read {path}: {exc}") from None
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UsageError(f"{path}: not JSON ({exc.msg} at line {exc.lineno})") from None
        if not isinstance(data, list):
            raise UsageError(f"{path}: a .json data file must hold a list of records")
        return data
    out: list[dict[str, Any]] = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise UsageError(f"{path} line {n}: not JSON ({exc.msg})") from None
        if limit is not None and len(out) >= limit:
            break
    return out


def _hub_records(spec: str, task: TaskSpec, limit: int | None) -> Iterable[dict[str, Any]]:
    """``NAME[:SPLIT]`` from the hub, e.g. ``rajpurkar/squad:validation``,
    ``EdinburghNLP/xsum``, ``HuggingFaceH4/ultrachat_200k:test_sft``."""
    name, _, split = spec.partition(":")
    if not name:
        raise UsageError("hf: needs a dataset name, e.g. hf:rajpurkar/squad:validation")
    try:
        import datasets
    except ImportError:
        raise missing_package("datasets") from None
    split = split or task.hf_default_split
    try:
        ds = datasets.load_dataset(name, split=split, streaming=True)
        it = iter(ds)
        out = []
        for rec in it:
            out.append(dict(rec))
            if limit is not None and len(out) >= limit:
                break
        return out
    except Exception as exc:                              # noqa: BLE001 - network, auth, name
        first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise UsageError(f"cannot load hf:{name} split {split}: {first}") from None
