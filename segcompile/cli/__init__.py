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
import contextlib
import time
from collections.abc import Callable
from pathlib import Path

from ..errors import SegcompileError
from ..files import OutputPathError, check_writable


class UsageError(SegcompileError):
    """Flags the command cannot run with. Exit status 2, one ``error:`` line and a hint."""

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.hint = hint


# ---- output locations: checked in validate, before the work ---------------------------------
def check_out_file(path: str, flag: str = "--out") -> None:
    """UsageError unless the file ``path`` can be written: a file is created and removed in its
    folder now, so that a read-only place fails in a second, not after the work."""
    with _reported_as_usage(f"give {flag} a file in a folder you can write to"):
        check_writable(Path(path).parent, f"{flag} {path}")


def check_out_dir(path: str, check: Callable[[str, str], None], flag: str = "--out", hint: str | None = None) -> None:
    """UsageError unless the folder ``path`` can take the output: ``check(path, what)`` raises
    ``OutputPathError`` if not (``passes.manager.check_dump_dir`` for pass dumps, which replace
    an earlier output; ``files.check_writable`` for a folder that is only written in)."""
    hint = hint or f"give {flag} a new or empty folder, or an earlier output (it is replaced), in a place you can write to"
    with _reported_as_usage(hint):
        check(path, f"{flag} {path}")


@contextlib.contextmanager
def _reported_as_usage(hint: str):
    try:
        yield
    except OutputPathError as e:
        raise UsageError(str(e), hint=hint) from e


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


def fraction_or_plan(text: str) -> float | str:
    """A fraction of KV heads in [0, 1], or the path of a head-plan JSON file."""
    try:
        value = float(text)
    except ValueError:
        return text  # a plan file; check_plan_file() checks that it exists
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a fraction in [0, 1] or a plan JSON file, got {text!r}")
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


@contextlib.contextmanager
def stage(console, stages: list[str], index: int, seconds: dict[str, float], label: str):
    """One stage under a spinner (only on a terminal), then one line with its time."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    prefix = f"[{index + 1}/{len(stages)}]"
    progress = Progress(
        SpinnerColumn(), TextColumn(f"{prefix} {label}"), TimeElapsedColumn(),
        console=console, transient=True, disable=not console.is_terminal,
    )
    start = time.perf_counter()
    with progress:
        progress.add_task(label, total=None)
        yield
    seconds[stages[index]] = time.perf_counter() - start
    console.print(f"{prefix} {label:<56} {seconds[stages[index]]:6.2f} s", markup=False, soft_wrap=True)


class ProgressBar:
    """A bar (only on a terminal) over work counted in items, as ``with ProgressBar(...) as bar``:
    ``update(done, total)`` where the work reports its own count (``select_heads``' progress),
    ``step(done, total)`` to advance one item of a ``total`` given up front (the counts the
    callback passes are then one plan's of several), ``describe`` to change its text."""

    def __init__(self, console, label: str = "", total: int | None = None):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                            console=console, transient=True, disable=not console.is_terminal)
        self.task = self.bar.add_task(label, total=total, start=total is not None)

    def __enter__(self) -> ProgressBar:
        self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        return self.bar.__exit__(*exc)

    def describe(self, text: str) -> None:
        self.bar.update(self.task, description=text)

    def update(self, done: int, total: int) -> None:
        self.bar.start_task(self.task)
        self.bar.update(self.task, completed=done, total=total)

    def step(self, done: int, total: int) -> None:
        self.bar.advance(self.task)


def torch_device(name: str | None):
    """The torch device ``--device NAME`` names (default: CUDA if there is one, else the CPU);
    a UsageError for a name torch does not know or a CUDA device this torch lacks."""
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name}: not a torch device", hint="use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: this torch has no CUDA device", hint="leave out --device to run on the CPU")
    return device


def quiet(fn, *args, **kwargs):
    """Run ``fn`` with torch.onnx's progress lines (printed to stdout), its logging and Python
    warnings silenced: the exporter's chatter would break the command's own display."""
    import io
    import logging
    import warnings

    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._export", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return fn(*args, **kwargs)
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def make_console(args: argparse.Namespace):
    """A rich console on stdout. Plain text when stdout is not a terminal or with ``--no-color``."""
    from rich.console import Console

    no_color = getattr(args, "no_color", False)
    return Console(no_color=no_color, color_system=None if no_color else "auto", highlight=False)


# ---- the segment flags every compiling command takes ---------------------------------------
# --history-dtype words, and the SegmentConfig.history_dtype each means (``history_dtype_of``)
HISTORY_DTYPE_WORDS = ("model", "fp8")
HISTORY_DTYPE_HELP = "how the long-range history is stored: in the model's dtype, or fp8 (e4m3, a scale per 64 positions)"


def history_dtype_of(word: str):
    """The ``SegmentConfig.history_dtype`` a ``--history-dtype`` word means."""
    import torch

    return {"model": None, "fp8": torch.float8_e4m3fn}[word]


def history_phrase(history_dtype) -> str:
    """What a command's summary adds for ``SegmentConfig.history_dtype``: ``"history fp8"`` for a
    quantised history, nothing for one in the model's dtype."""
    word = next(w for w in HISTORY_DTYPE_WORDS if history_dtype_of(w) == history_dtype)
    return "" if word == "model" else f"history {word}"


def segments_row(cfg) -> str:
    """A summary's "segments" row: S, T, G, the head plan, and the history's storage if fp8."""
    sizes = f"S={cfg.segment_len}  T={cfg.tail_len}  G={cfg.sink_tokens}"
    return "; ".join(filter(None, [sizes, f"head plan {cfg.long_range.describe()}", history_phrase(cfg.history_dtype)]))


def add_segment_flags(parser: argparse.ArgumentParser, *, segment_len: int, sinks: int, long_range: bool = True,
                      history_dtype: bool = True) -> None:
    """--segment-len, --tail-len, --sinks and (unless the command chooses the plan, or the
    history dtypes) --long-range and --history-dtype."""
    group = parser.add_argument_group("segments")
    group.add_argument("--segment-len", type=positive_int, default=segment_len, help="S, tokens per segment")
    group.add_argument(
        "--tail-len", type=non_negative_int, default=None,
        help="T, keys of the previous segment every head sees (default: S, the whole previous segment)",
    )
    group.add_argument("--sinks", type=non_negative_int, default=sinks, help="G, first tokens every head sees")
    if long_range:
        group.add_argument(
            "--long-range", type=fraction_or_plan, default=0.25, metavar="FRACTION|PLAN.json",
            help="fraction of KV heads that see the whole history, or a head-plan JSON file",
        )
    if history_dtype:
        group.add_argument("--history-dtype", choices=HISTORY_DTYPE_WORDS, default="model", help=HISTORY_DTYPE_HELP)


def check_plan_file(args: argparse.Namespace) -> None:
    from pathlib import Path

    if isinstance(args.long_range, str) and not Path(args.long_range).is_file():
        raise UsageError(
            f"--long-range {args.long_range}: no such plan file",
            "give a fraction such as 0.25, or a plan written by HeadPlan.save",
        )


def segment_config(args: argparse.Namespace):
    """The SegmentConfig the segment flags describe (ConfigError/PlanError, exit 2, on bad values)."""
    import segcompile as sc

    if isinstance(args.long_range, float):
        plan = sc.HeadPlan.fraction(args.long_range)
    else:
        plan = sc.HeadPlan.load(args.long_range)
    return sc.SegmentConfig(segment_len=args.segment_len, tail_len=args.tail_len, sink_tokens=args.sinks, long_range=plan,
                            history_dtype=history_dtype_of(args.history_dtype))
