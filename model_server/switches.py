"""The model server's ``MODEL_SERVER_*`` environment switches: reading one, and the error a bad value raises.

Owns parsing a switch's text (:func:`flag`, :func:`integer`, :func:`seconds`, :func:`choice`) and
:class:`SwitchValueError`, the one type every bad switch value raises, so ``serve`` can tell a misconfiguration (always
an error) from a model an engine cannot serve (``--engine auto`` falls back). Must NOT decide what a switch does: its
reader does.
"""
from __future__ import annotations

import os


class SwitchValueError(ValueError):
    """A ``MODEL_SERVER_*`` switch with a value it does not take; the message is one line and names the switch."""


def flag(name: str) -> bool | None:
    """A ``0``/``1`` switch: True, False, or None when unset or empty; anything else raises :class:`SwitchValueError`."""
    raw = os.environ.get(name, "").strip()
    if raw and raw not in ("0", "1"):
        raise SwitchValueError(f"{name} must be 0 or 1, got {raw!r}")
    return None if not raw else raw == "1"


def integer(name: str) -> int | None:
    """An integer switch, None when unset or empty; anything else raises :class:`SwitchValueError`."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    try:
        return int(raw)
    except ValueError:
        raise SwitchValueError(f"{name} must be an integer, got {raw!r}") from None


def seconds(name: str) -> float | None:
    """A duration in seconds (a number >= 0), None when unset or empty; anything else raises
    :class:`SwitchValueError`."""
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0.0 or value == float("inf"):
        raise SwitchValueError(f"{name} must be a number of seconds >= 0, got {raw!r}")
    return value


def choice(name: str, options: tuple[str, ...]) -> str:
    """One of ``options``, the first when unset or empty; anything else raises :class:`SwitchValueError`."""
    raw = os.environ.get(name, "").strip() or options[0]
    if raw not in options:
        raise SwitchValueError(f"{name} must be one of {', '.join(options)}, got {raw!r}")
    return raw
