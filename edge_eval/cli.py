"""``edge-eval``: the argparse parser; subcommands are registered from their modules.

Each subcommand module exposes ``register(subparsers) -> None``: it adds its parser and sets
``func`` (called with the parsed namespace, returns an exit code). Adding a subcommand is one line
in :data:`SUBCOMMAND_MODULES`.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from edge_eval.errors import RunFailed, UsageError
from edge_proxy.cli_errors import OneLineErrorParser, os_error_line

SUBCOMMAND_MODULES: list[str] = [
    "edge_eval.eval_cmd",       # edge-eval eval
    "edge_eval.adapt",          # edge-eval adapt
    "edge_eval.metrics_cmd",    # edge-eval metrics
    "edge_eval.report",         # edge-eval report
    "edge_eval.bench_cmd",      # edge-eval bench
]


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(prog="edge-eval", description=(
        "The offline side of EDGE-EVAL: evaluate a model through edge-proxy (scores and joules per "
        "item, IPW with 95% CIs) and adapt one with LoRA/QLoRA (measured energy for N_break)."))
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=OneLineErrorParser)
    sub.required = True
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UsageError as exc:
        print(f"edge-eval: error: {exc}", file=sys.stderr)
        return 2
    except RunFailed as exc:
        print(f"edge-eval: run failed: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:                          # e.g. --out names a file: one line, not a traceback
        print(f"edge-eval {args.command}: error: {os_error_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("edge-eval: interrupted (results so far are saved; --resume continues)",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
