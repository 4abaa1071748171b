"""The MODEL argument of the commands that compile a model: a local Hugging Face folder, or the
built-in tiny Llama. Light at import time; transformers is imported only to load a folder."""

from __future__ import annotations

import argparse
from pathlib import Path

from . import UsageError, positive_int

DEFAULT_TINY_LAYERS = 4


def add_model_args(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """MODEL_DIR and --layers; returns the "model" group for command-specific model flags."""
    parser.add_argument(
        "model_dir", nargs="?", metavar="MODEL_DIR",
        help="a local Hugging Face model folder (config.json and safetensors weights; its code is never run). "
        "Default: the built-in tiny Llama",
    )
    group = parser.add_argument_group("model")
    group.add_argument(
        "--layers", type=positive_int, default=None,
        help=f"decoder layers of the built-in tiny Llama (default: {DEFAULT_TINY_LAYERS}; not with MODEL_DIR)",
    )
    return group


def check_model_args(args: argparse.Namespace) -> None:
    if args.model_dir is None:
        return
    folder = Path(args.model_dir)
    if not folder.is_dir():
        raise UsageError(
            f"MODEL_DIR {args.model_dir} does not exist or is not a folder",
            hint="name a local Hugging Face model folder (with config.json), or leave it out for the built-in tiny Llama",
        )
    if not (folder / "config.json").is_file():
        raise UsageError(f"MODEL_DIR {args.model_dir} has no config.json", hint="name the folder save_pretrained() wrote")
    if args.layers is not None:
        raise UsageError("--layers applies to the built-in tiny Llama only", hint="leave out MODEL_DIR or --layers")


def model_label(args: argparse.Namespace) -> str:
    if args.model_dir is not None:
        return f"load {args.model_dir}"
    return f"build the tiny Llama ({args.layers or DEFAULT_TINY_LAYERS} layers, random init)"


def load_model(args: argparse.Namespace):
    """The eval-mode model MODEL_DIR holds (never its own code; safetensors only), or the tiny Llama."""
    if args.model_dir is None:
        from ..testing.models import tiny_llama

        return tiny_llama(num_layers=args.layers or DEFAULT_TINY_LAYERS)
    import transformers

    transformers.logging.set_verbosity_error()
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            args.model_dir, trust_remote_code=False, use_safetensors=True
        )
    except (OSError, ValueError) as e:
        raise UsageError(
            f"could not load {args.model_dir}: {' '.join(str(e).split())[:300]}",
            hint="the folder needs config.json and *.safetensors weights of a transformers causal LM "
            "(models that need their own code are not loaded)",
        ) from e
    return model.eval()
