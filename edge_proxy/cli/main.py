"""``edge-proxy`` command line: one subcommand per module. Owns the parser, one-line errors and exit
codes (the parser class and error wording: :mod:`edge_proxy.cli_errors`); must not import a subcommand's heavy
dependencies at import time.

To add a subcommand, append its module to :data:`SUBCOMMAND_MODULES`. The module defines
``add_parser(subparsers) -> argparse.ArgumentParser`` and sets ``func=<callable(args) -> int>`` on
it with ``parser.set_defaults(func=...)``. Keep module imports light (import heavy things inside
``func``). Errors: raise :class:`CliError` (or ConfigError) for a one-line message and exit 2.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from edge_proxy.cli_errors import OneLineErrorParser, os_error_line
from edge_proxy.config import ConfigError

SUBCOMMAND_MODULES: list[str] = [
    "edge_proxy.cli.serve",     # serve (proxy engineer)
    "edge_proxy.demo.command",  # demo (economics engineer)
    "edge_proxy.energy.record_cmd",  # record (energy engineer)
]


class CliError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="edge-proxy",
        description="Serving-side instrumentation proxy for LLM inference: per-request timeline, "
                    "tokens, energy and cost, exported to Prometheus, OpenTelemetry and a JSON access log.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (CliError, ConfigError) as exc:
        print(f"edge-proxy {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"edge-proxy {args.command}: error: {os_error_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
