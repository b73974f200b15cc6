"""Errors with a one-line message for the CLI (exit code 2 for bad input, 1 for a failed run)."""
from __future__ import annotations


class UsageError(Exception):
    """Bad input (unknown task, unreadable data, missing optional package): one line, exit 2."""


class RunFailed(Exception):
    """A run that started but could not finish (endpoint down after retries): exit 1, partial
    results are on disk."""


def missing_package(package: str, extra: str = "eval") -> UsageError:
    """The error for an optional package that is not installed, naming the fix."""
    return UsageError(f"{package} is not installed: pip install 'edge-eval[{extra}]' "
                      f"(or pip install {package})")
