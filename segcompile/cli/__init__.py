"""The ``segcompile`` command line.

``main.py`` builds the parser and dispatches; every subcommand is one module here with

    name: str                      the subcommand
    help: str                      one line for ``segcompile --help``
    subparser_init(subparsers)     add its parser and flags; returns the parser
    validate(args)                 cross-flag checks, raising ``UsageError``; no heavy imports
    cmd(args) -> int               the work; torch/transformers/segcompile internals imported here

and is listed in ``main.COMMANDS``. This module holds what the commands share and stays light
(no torch, no rich at import time).
"""

from __future__ import annotations

import argparse

from ..errors import SegcompileError


class UsageError(SegcompileError):
    """Flags the command cannot run with. Exit status 2, one ``error:`` line and a hint."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint


# ---- argparse types: a bad value is an argparse error (exit 2, usage line) ------------------
def positive_int(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {text!r}")
    return value


def fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1], got {text!r}") from None
    if not 0.0 <= value <= 1.0:  # also rejects nan
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1], got {text!r}")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` after a flag's help, except where the default is None (the help says it)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def make_console(args: argparse.Namespace):
    """A rich console on stdout. Plain text when stdout is not a terminal or with ``--no-color``."""
    from rich.console import Console

    no_color = getattr(args, "no_color", False)
    return Console(no_color=no_color, color_system=None if no_color else "auto", highlight=False)
