"""Chat templates rendered as transformers renders them, without transformers.

The environment is the one ``apply_chat_template`` uses: a sandboxed (immutable) Jinja environment with
``trim_blocks`` and ``lstrip_blocks``, the loop-control extension (``break`` / ``continue``), a ``tojson``
filter that does not escape HTML and takes ``indent`` / ``separators`` / ``sort_keys``, the globals
``raise_exception`` (a ``TemplateError``), ``strftime_now``, a ``dict`` and a ``namespace`` that refuse
underscore names, and a ``{% generation %}`` block that renders its body. Messages are passed with their
``None`` values dropped and reasoning fields aliased (``reasoning_content`` / ``thinking`` / ``reasoning``),
with the tokenizer's named special tokens (``bos_token`` ...) and ``add_generation_prompt`` as variables.

Owns the environment and :func:`render`; which template and which special tokens is the tokenizer's.
"""
from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

MIN_JINJA = (3, 1, 6)            # older releases have known sandbox escapes (transformers refuses them too)
REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def jinja_ok() -> bool:
    try:
        return tuple(int(x) for x in jinja2.__version__.split(".")[:3]) >= MIN_JINJA
    except ValueError:
        return False


class _Generation(Extension):
    """``{% generation %} ... {% endgeneration %}``: marks assistant text for training masks; here it only
    renders its body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return caller()


def _tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _Dict:
    """``dict(...)`` and ``dict.fromkeys(...)`` for templates, with no other attribute to reach."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _Namespace(jinja2.utils.Namespace):
    """Jinja's ``namespace`` refusing underscore-prefixed names."""

    def __init__(*args: Any, **kwargs: Any) -> None:     # noqa: N805 - Jinja's own signature trick
        self, rest = args[0], args[1:]
        attrs = dict(*rest, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set {name!r} on a namespace")


@lru_cache(maxsize=8)
def compile_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _Dict()
    env.globals["namespace"] = _Namespace
    return env.from_string(source)


def _plain(value: Any) -> Any:
    """JSON-like data only (strings, numbers, lists, dicts); anything else becomes ``<TypeName>``."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    return f"<{type(value).__name__}>"


def _message(message: dict[str, Any]) -> dict[str, Any]:
    m = {k: v for k, v in message.items() if v is not None}
    reasoning = next((m[k] for k in REASONING_FIELDS if m.get(k) is not None), None)
    if reasoning is not None:
        m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
    return m


def render(source: str, messages: list[dict[str, Any]], add_generation_prompt: bool,
           special_tokens: dict[str, str], **kwargs: Any) -> str:
    """One conversation through the template ``source``; raises the template's own errors."""
    if not messages:
        raise ValueError("Cannot apply chat template to an empty conversation. Provide at least one message.")
    chat = []
    for message in messages:
        if not isinstance(message, dict):
            raise TypeError(f"chat messages must be dicts, not {type(message).__name__}")
        chat.append(_message(_plain(message)))
    variables = _plain({**special_tokens, **kwargs})
    return compile_template(source).render(messages=chat, tools=None, documents=None,
                                           add_generation_prompt=add_generation_prompt, **variables)
