"""The MODEL argument of the commands that compile a model: a local Hugging Face folder, or the
built-in tiny Llama; for the commands that allow it (``gguf=True``), also a ``.gguf`` file or a
folder holding one, read by transformers (``gguf_file=``, which needs the ``gguf`` package). Light
at import time; transformers is imported only to load a folder."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

from . import UsageError, positive_int

DEFAULT_TINY_LAYERS = 4
GGUF_HINT = 'reading .gguf files needs `pip install "gguf>=0.10" accelerate` (transformers loads them with gguf_file=)'
# What a folder's tokenizer is saved as (any one of them is enough for AutoTokenizer)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def add_model_args(parser: argparse.ArgumentParser, gguf: bool = False) -> argparse._ArgumentGroup:
    """MODEL_DIR (``gguf``: MODEL, which may be a .gguf file) and --layers; returns the "model"
    group for command-specific model flags."""
    if gguf:
        parser.add_argument(
            "model_dir", nargs="?", metavar="MODEL",
            help="a local Hugging Face model folder (config.json and safetensors weights; its code is never run), "
            "a .gguf file or a folder holding one. Default: the built-in tiny Llama",
        )
    else:
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


def check_model_args(args: argparse.Namespace, gguf: bool = False) -> None:
    """MODEL_DIR names a model folder (``gguf``: or a .gguf file, or a folder holding one, with
    the packages that read it installed); --layers only without it."""
    if args.model_dir is None:
        return
    if gguf and gguf_file(args.model_dir) is not None:
        _check_gguf(args)
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


def gguf_file(model: str) -> Path | None:
    """The .gguf file ``model`` names: itself, or the one in a folder without config.json (None
    if neither). A folder holding several is a UsageError."""
    path = Path(model)
    if path.is_file() and path.suffix.lower() == ".gguf":
        return path
    if not path.is_dir() or (path / "config.json").is_file():
        return None
    found = sorted(path.glob("*.gguf"))
    if len(found) > 1:
        raise UsageError(f"{model} holds {len(found)} .gguf files ({', '.join(p.name for p in found)})",
                         hint="name the .gguf file to load")
    return found[0] if found else None


def missing_gguf_packages() -> list[str]:
    """The packages transformers needs to read a .gguf file that are not installed."""
    return [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]


def _check_gguf(args: argparse.Namespace) -> None:
    missing = missing_gguf_packages()
    if missing:
        raise UsageError(f"{args.model_dir}: a GGUF model, but {' and '.join(missing)} not installed", hint=GGUF_HINT)
    if args.layers is not None:
        raise UsageError("--layers applies to the built-in tiny Llama only", hint="leave out MODEL or --layers")


def _source(model: str, folder_options: dict) -> tuple[str, dict]:
    """The folder and the from_pretrained options that load MODEL: the .gguf file by its name in
    its folder, else the folder with ``folder_options``."""
    gguf = gguf_file(model)
    if gguf is None:
        return model, folder_options
    return str(gguf.parent), {"gguf_file": gguf.name}


def has_tokenizer(args: argparse.Namespace) -> bool:
    """Whether MODEL holds a tokenizer (a .gguf file always does; the tiny Llama has none)."""
    if args.model_dir is None:
        return False
    if gguf_file(args.model_dir) is not None:
        return True
    return any((Path(args.model_dir) / name).is_file() for name in TOKENIZER_FILES)


def model_label(args: argparse.Namespace) -> str:
    if args.model_dir is not None:
        return f"load {args.model_dir}"
    return f"build the tiny Llama ({args.layers or DEFAULT_TINY_LAYERS} layers, random init)"


def load_model(args: argparse.Namespace):
    """The eval-mode model MODEL_DIR holds (never its own code; safetensors weights, or the .gguf file
    ``gguf_file`` finds), or the tiny Llama."""
    if args.model_dir is None:
        from ..testing.models import tiny_llama

        return tiny_llama(num_layers=args.layers or DEFAULT_TINY_LAYERS)
    import transformers

    from safetensors import SafetensorError

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # the command shows its own progress
    folder, source = _source(args.model_dir, {"use_safetensors": True})
    if "gguf_file" not in source:
        check_weight_files(Path(folder))
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=False, **source)
    except (OSError, ValueError, ImportError, SafetensorError) as e:
        if "gguf_file" not in source:
            hint = ("the folder needs config.json and *.safetensors weights of a transformers causal LM "
                    "(models that need their own code are not loaded)")
        elif isinstance(e, ImportError):
            hint = GGUF_HINT
        else:
            hint = "transformers reads the GGUF files of the architectures it knows (none that needs its own code)"
        raise UsageError(f"could not load {args.model_dir}: {' '.join(str(e).split())[:300]}", hint=hint) from e
    return model.eval()


def check_weight_files(folder: Path) -> None:
    """UsageError naming the first ``*.safetensors`` file of ``folder`` whose header does not read
    or does not cover the file (truncated, or not safetensors). Reads the headers only: cheap,
    and it names the file where transformers' own error would not."""
    from safetensors import SafetensorError, safe_open

    for path in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except (SafetensorError, OSError) as e:
            raise UsageError(
                f"{path} is not a complete safetensors file ({' '.join(str(e).split())[:200]})",
                hint="the file is truncated or damaged: copy or download it again, or save the model again "
                "with save_pretrained()",
            ) from e


def load_tokenizer(args: argparse.Namespace):
    """The tokenizer MODEL holds (never its own code), or None where it has none (``has_tokenizer``)."""
    if not has_tokenizer(args):
        return None
    import transformers

    folder, source = _source(args.model_dir, {})
    try:
        return transformers.AutoTokenizer.from_pretrained(folder, trust_remote_code=False, **source)
    except (OSError, ValueError, ImportError) as e:
        raise UsageError(
            f"could not load the tokenizer of {args.model_dir}: {' '.join(str(e).split())[:300]}",
            hint="save it beside the model with tokenizer.save_pretrained(folder), or give --prompt-ids",
        ) from e
