"""``segcompile``: the command-line entry point.

Only the chosen subcommand's module is imported (``COMMANDS`` maps names to modules); the
top-level ``--help`` imports them all, which is cheap because each keeps its heavy imports
inside ``cmd``.

Exit status: 0 success; 1 the command ran and a check failed; 2 a user error (bad flags, a
``SegcompileError`` such as an invalid ``SegmentConfig``), reported as one ``error:`` line and a
hint, with the traceback only under ``--debug``; 130 interrupted. Anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback
from collections.abc import Sequence
from types import ModuleType

from ..errors import SegcompileError
from . import UsageError

PROG = "segcompile"

# name -> module. Adding a subcommand is one line here (export, viz, heads, bench, run come later).
COMMANDS: dict[str, str] = {
    "demo": "segcompile.cli.demo",
    "viz": "segcompile.cli.viz",
    "export": "segcompile.cli.export",
    "run": "segcompile.cli.run",
    "heads": "segcompile.cli.heads",
    "generate": "segcompile.cli.generate",
    "eval": "segcompile.cli.eval",
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``segcompile`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        parser, commands = _build_parser(_selected(argv))
        args = parser.parse_args(argv)
        debug = getattr(args, "debug", False)
        command = commands.get(args.command)
        if command is None:
            parser.print_help()
            return 0
        command.validate(args)
        return int(command.cmd(args) or 0)
    except SystemExit as e:  # argparse: --help (0) or a bad flag (2, after printing usage)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    except SegcompileError as e:
        if debug:
            traceback.print_exc()
        print(f"error: {_one_line(e)}", file=sys.stderr)
        print(f"hint: {_hint(e, argv)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _selected(argv: list[str]) -> str | None:
    """The subcommand named on the command line (its flags all follow it), if it is a known one."""
    first = next((a for a in argv if not a.startswith("-")), None)
    return first if first in COMMANDS else None


def _load(name: str) -> ModuleType:
    module = importlib.import_module(COMMANDS[name])
    if getattr(module, "name", None) != name:
        raise RuntimeError(f"{COMMANDS[name]} declares name={getattr(module, 'name', None)!r}, registered as {name!r}")
    return module


def _common_flags(parser: argparse.ArgumentParser, suppress_defaults: bool) -> None:
    # Accepted before and after the subcommand. The subcommand's copies use SUPPRESS so that they
    # do not overwrite a value given before it.
    default = {"default": argparse.SUPPRESS} if suppress_defaults else {"default": False}
    parser.add_argument("--debug", action="store_true", help="show the traceback of a user error", **default)
    parser.add_argument("--no-color", action="store_true", help="plain text output, no colours or styles", **default)


def _build_parser(selected: str | None) -> tuple[argparse.ArgumentParser, dict[str, ModuleType]]:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Compile a causal LM's attention into a training-inference consistent segment loop.",
        epilog=f"Run `{PROG} <command> --help` for a command's flags.",
    )
    _common_flags(parser, suppress_defaults=False)
    subparsers = parser.add_subparsers(dest="command", metavar="<command>", title="commands")
    names = [selected] if selected is not None else list(COMMANDS)
    commands = {name: _load(name) for name in names}
    for module in commands.values():
        sub = module.subparser_init(subparsers)
        _common_flags(sub, suppress_defaults=True)
    return parser, commands


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _hint(error: SegcompileError, argv: list[str]) -> str:
    if isinstance(error, UsageError) and error.hint:
        return error.hint
    command = _selected(argv)
    where = f"`{PROG} {command} --help`" if command else f"`{PROG} --help`"
    return f"see {where} for the flags; add --debug for the traceback"


if __name__ == "__main__":
    sys.exit(main())
