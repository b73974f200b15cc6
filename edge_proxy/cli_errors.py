"""One-line command-line errors, shared by the three command lines (``edge-proxy``, ``model-server``, ``edge-eval``).

Owns the argument parser class they build on (usage errors as one line, long options spelled out) and the wording of
a file-system error. Standard library only: importing it must stay cheap (``model-server --help``, cold start).
"""
from __future__ import annotations

import argparse
from typing import NoReturn


class OneLineErrorParser(argparse.ArgumentParser):
    """Usage errors as one line (``PROG: error: MSG (see --help)``), exit status 2. Long options must be spelled out
    (no prefix matching: ``--upstream URL`` is an unknown option, not ``--upstream-timeout URL``). Subcommands'
    parsers are of this class too (argparse makes them of the parent's)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> "NoReturn":  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def os_error_line(exc: OSError) -> str:
    """A file-system error as users read it: ``cannot use PATH: REASON`` (no traceback), e.g. an access log in a
    directory that does not exist, or an output directory that is a file."""
    reason = exc.strerror or str(exc)
    return f"cannot use {exc.filename}: {reason}" if exc.filename else reason
