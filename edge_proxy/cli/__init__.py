"""The ``edge-proxy`` command line: the dispatcher (:mod:`.main`: parser, one-line errors, exit
codes) and the ``serve`` subcommand (:mod:`.serve`: flags to settings, run the proxy). Other
subcommands live with what they run (``demo`` in :mod:`edge_proxy.demo.command`, ``record`` in
:mod:`edge_proxy.energy.record_cmd`). No proxy logic here: parse, build settings, call."""
from edge_proxy.cli.main import CliError, OneLineErrorParser, build_parser, main

__all__ = ["CliError", "OneLineErrorParser", "build_parser", "main"]
