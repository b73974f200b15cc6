"""The bench grid file: schema, validation with file positions, expansion into variants, presets.

A grid (YAML) lists models, quantizations, tasks, adaptations and the load; the variants are their
product (docs/evaluation.md, "Reproducing the paper"). Validation reads the YAML node tree, so an
unknown key or an impossible variant is reported as ``FILE:LINE:COLUMN: ...`` (one line, exit 2)
before anything starts.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from edge_eval.errors import UsageError
from edge_proxy.config import yaml_error_line

QUANTIZATIONS = ("none", "fp16", "bf16", "int8", "nf4", "int4", "gptq")
ADAPTATIONS = ("none", "lora", "qlora")
TASKS = ("rag", "summarization", "chat")
DEVICES = ("auto", "cpu", "cuda")
ENERGY_SOURCES = ("auto", "nvml", "estimated")
PRECISION_LABEL = {"none": "FP16", "fp16": "FP16", "bf16": "BF16", "int8": "INT8", "nf4": "INT4",
                   "int4": "INT4", "gptq": "INT4"}
SYNTH_PRESETS = ("tiny", "llama-3.2-1b", "qwen2.5-0.5b")

TOP_KEYS = {"models", "quantizations", "tasks", "adaptation", "load", "passes", "eval", "device",
            "energy_source", "seed"}
MODEL_KEYS = {"name", "path", "synth", "size_label"}
TASK_KEYS = {"name", "data", "limit"}
LOAD_KEYS = {"batch_requests", "max_tokens", "concurrency", "sweep_requests"}
EVAL_KEYS = {"limit", "max_tokens", "concurrency"}
ADAPT_KEYS = {"steps", "limit"}


@dataclass(frozen=True)
class Variant:
    name: str
    model: str                      # path or hub id (synth models: filled in at run time)
    synth: str | None
    size_label: str
    quantization: str
    task: str
    data: str
    eval_limit: int
    adaptation: str
    reference: str | None = None    # Q_ret reference: same model/adaptation/task, unquantized

    @property
    def precision(self) -> str:
        return "INT4" if self.adaptation == "qlora" else PRECISION_LABEL[self.quantization]


@dataclass
class Grid:
    variants: list[Variant]
    device: str = "auto"
    energy_source: str = "auto"
    passes: int = 1
    seed: int = 0
    batch_requests: int = 100
    max_tokens: int = 16
    concurrency: list[int] = field(default_factory=list)
    sweep_requests: int = 8
    eval_max_tokens: int | None = None
    eval_concurrency: int = 1       # edge-eval eval requests in flight (the score is greedy)
    adapt_steps: int = 300
    adapt_limit: int = 2000

    def to_json(self) -> dict[str, Any]:
        return {"device": self.device, "energy_source": self.energy_source, "passes": self.passes,
                "seed": self.seed, "batch_requests": self.batch_requests,
                "max_tokens": self.max_tokens, "concurrency": self.concurrency,
                "sweep_requests": self.sweep_requests, "eval_concurrency": self.eval_concurrency,
                "variants": [v.__dict__ | {"precision": v.precision} for v in self.variants]}


def _where(src: str, node: yaml.Node) -> str:
    m = node.start_mark
    return f"{src}:{m.line + 1}:{m.column + 1}"


def _fail(src: str, node: yaml.Node, msg: str) -> UsageError:
    return UsageError(f"{_where(src, node)}: {msg}")


def _mapping(src: str, node: yaml.Node, keys: set[str], what: str) -> dict[str, yaml.Node]:
    if not isinstance(node, yaml.MappingNode):
        raise _fail(src, node, f"{what} must be a mapping")
    out: dict[str, yaml.Node] = {}
    for k, v in node.value:
        key = str(k.value)
        if key not in keys:
            raise _fail(src, k, f"unknown key {key!r} in {what} (known: {', '.join(sorted(keys))})")
        out[key] = v
    return out


def _seq(src: str, node: yaml.Node, what: str) -> list[yaml.Node]:
    if isinstance(node, yaml.ScalarNode):
        return [node]
    if not isinstance(node, yaml.SequenceNode) or not node.value:
        raise _fail(src, node, f"{what} must be a non-empty list")
    return list(node.value)


def _scalar(src: str, node: yaml.Node, what: str, choices: tuple[str, ...] | None = None) -> str:
    if not isinstance(node, yaml.ScalarNode):
        raise _fail(src, node, f"{what} must be a scalar")
    text = str(node.value)
    if choices is not None and text not in choices:
        raise _fail(src, node, f"{what} {text!r} is not one of: {', '.join(choices)}")
    return text


def _int(src: str, node: yaml.Node, what: str, minimum: int = 1) -> int:
    text = _scalar(src, node, what)
    try:
        value = int(text)
    except ValueError:
        raise _fail(src, node, f"{what} must be an integer, got {text!r}") from None
    if value < minimum:
        raise _fail(src, node, f"{what} must be >= {minimum}")
    return value


def parse(text: str, src: str) -> Grid:
    """Validate a grid document; every error names the file position of the offending node."""
    try:
        root = yaml.compose(text)
    except yaml.YAMLError as exc:
        raise UsageError(f"{src}: not valid YAML: {yaml_error_line(exc)}") from None
    if root is None:
        raise UsageError(f"{src}: empty grid file")
    top = _mapping(src, root, TOP_KEYS, "the grid")
    if "models" not in top:
        raise _fail(src, root, "missing key 'models'")
    grid = Grid(variants=[])
    if "device" in top:
        grid.device = _scalar(src, top["device"], "device", DEVICES)
    if "energy_source" in top:
        grid.energy_source = _scalar(src, top["energy_source"], "energy_source", ENERGY_SOURCES)
    if "passes" in top:
        grid.passes = _int(src, top["passes"], "passes")
    if "seed" in top:
        grid.seed = _int(src, top["seed"], "seed", 0)
    eval_limit = 50
    if "eval" in top:
        ev = _mapping(src, top["eval"], EVAL_KEYS, "eval")
        eval_limit = _int(src, ev["limit"], "eval.limit") if "limit" in ev else eval_limit
        if "max_tokens" in ev:
            grid.eval_max_tokens = _int(src, ev["max_tokens"], "eval.max_tokens")
        if "concurrency" in ev:
            grid.eval_concurrency = _int(src, ev["concurrency"], "eval.concurrency")
    if "load" in top:
        ld = _mapping(src, top["load"], LOAD_KEYS, "load")
        if "batch_requests" in ld:
            grid.batch_requests = _int(src, ld["batch_requests"], "load.batch_requests")
        if "max_tokens" in ld:
            grid.max_tokens = _int(src, ld["max_tokens"], "load.max_tokens")
        if "sweep_requests" in ld:
            grid.sweep_requests = _int(src, ld["sweep_requests"], "load.sweep_requests")
        if "concurrency" in ld:
            grid.concurrency = [_int(src, n, "load.concurrency")
                                for n in _seq(src, ld["concurrency"], "load.concurrency")]
    models: list[tuple[str, str, str | None, str, yaml.Node]] = []
    for node in _seq(src, top["models"], "models"):
        if isinstance(node, yaml.ScalarNode):
            m = {"path": node}
        else:
            m = _mapping(src, node, MODEL_KEYS, "a model")
        if ("path" in m) == ("synth" in m):
            raise _fail(src, node, "a model needs exactly one of 'path' or 'synth'")
        synth = _scalar(src, m["synth"], "synth", SYNTH_PRESETS) if "synth" in m else None
        path = _scalar(src, m["path"], "path") if "path" in m else ""
        name = _scalar(src, m["name"], "name") if "name" in m else (
            synth or Path(path.rstrip("/")).name)
        size = _scalar(src, m["size_label"], "size_label") if "size_label" in m else ""
        if path.startswith((".", "/")) and not Path(path).exists():
            raise _fail(src, m["path"], f"model path {path!r} does not exist")
        models.append((name, path, synth, size, node))
    quants = [(n, _scalar(src, n, "quantization", QUANTIZATIONS))
              for n in _seq(src, top.get("quantizations") or yaml.ScalarNode("tag:yaml.org,2002:str",
                                                                              "none"), "quantizations")]
    tasks: list[tuple[str, str, int]] = []
    for node in _seq(src, top["tasks"], "tasks") if "tasks" in top else []:
        if isinstance(node, yaml.ScalarNode):
            t = {"name": node}
        else:
            t = _mapping(src, node, TASK_KEYS, "a task")
        tname = _scalar(src, t["name"], "task", TASKS)
        data = _scalar(src, t["data"], "data") if "data" in t else f"builtin:{tname}:test"
        limit = _int(src, t["limit"], "limit") if "limit" in t else eval_limit
        tasks.append((tname, data, limit))
    if not tasks:
        raise _fail(src, root, "missing key 'tasks'")
    adapts: list[tuple[yaml.Node, str]] = []
    if "adaptation" in top:
        an = top["adaptation"]
        if isinstance(an, yaml.MappingNode):
            ad = _mapping(src, an, ADAPT_KEYS | {"methods"}, "adaptation")
            grid.adapt_steps = _int(src, ad["steps"], "adaptation.steps") if "steps" in ad else 300
            grid.adapt_limit = _int(src, ad["limit"], "adaptation.limit") if "limit" in ad else 2000
            an = ad.get("methods") or yaml.ScalarNode("tag:yaml.org,2002:str", "none")
        adapts = [(n, _scalar(src, n, "adaptation", ADAPTATIONS)) for n in _seq(src, an, "adaptation")]
    else:
        adapts = [(root, "none")]
    for qnode, q in quants:
        if q in ("int8", "nf4") and grid.device == "cpu":
            raise _fail(src, qnode, f"impossible variant: quantization {q} (bitsandbytes) needs a "
                        "CUDA device, the grid says device: cpu")
    for anode, a in adapts:
        if a == "qlora" and grid.device == "cpu":
            raise _fail(src, anode, "impossible variant: qlora (4-bit training) needs a CUDA "
                        "device, the grid says device: cpu")
    seen: dict[str, yaml.Node] = {}
    for name, path, synth, size, mnode in models:
        for _, a in adapts:
            for tname, data, limit in tasks:
                # QLoRA gives one merged variant, served 4-bit (the paper counts it as INT4)
                for qnode, q in (quants if a != "qlora" else [(quants[0][0], "nf4")]):
                    vname = f"{name}-{a}-{tname}-{'merged' if a == 'qlora' else q}"
                    if vname in seen:
                        raise _fail(src, qnode, f"variant {vname!r} appears twice")
                    seen[vname] = qnode
                    full = [x for _, x in quants if x in ("none", "fp16", "bf16")]
                    ref = (f"{name}-{a}-{tname}-{full[0]}"
                           if full and q in ("int8", "nf4", "int4", "gptq") and a != "qlora" else None)
                    grid.variants.append(Variant(vname, path, synth, size, q, tname, data, limit,
                                                 a, ref))
    return grid


def load_grid(path: Path) -> Grid:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"{path}: cannot read ({exc.strerror or exc})") from None
    return parse(text, str(path))
