"""What a result file records besides the numbers: the model, each program's plan, the device
and the texts, so that a measurement can be read, repeated and checked on its own."""

from __future__ import annotations

import importlib.metadata
import platform
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from . import passkey, texts

RESULT_FORMAT = "segcompile.eval"
RESULT_VERSION = 1


def describe_model(model, tokenizer, source: str) -> dict:
    config = getattr(model, "config", None)
    return {
        "source": source,
        "class": type(model).__name__,
        "layers": getattr(config, "num_hidden_layers", None),
        "heads": getattr(config, "num_attention_heads", None),
        "kv_heads": getattr(config, "num_key_value_heads", None),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "parameters": sum(p.numel() for p in model.parameters()),
        # the folder's name, not its path: result files are shared and committed
        "tokenizer": Path(str(getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__)).name,
    }


def describe_program(program) -> dict:
    """A SegmentedModel's plan as resolved on the model (its long-range KV heads per layer) and
    its kernels; ``None`` is the model itself."""
    if program is None:
        return {"plan": "full attention (the model itself)"}
    long_range = sum(len(site.long_range) for site in program.sites)
    total = sum(site.num_kv_heads for site in program.sites)
    return {
        "plan": program.cfg.long_range.describe(),
        "long_range_kv_heads": {str(site.layer): list(site.long_range) for site in program.sites if site.long_range},
        "long_range_share": f"{long_range}/{total}",
        # how the long-range history is stored: "model" (the model's dtype) or the quantised dtype
        "history_dtype": ("model" if program.cfg.history_dtype is None
                          else str(program.cfg.history_dtype).removeprefix("torch.")),
        "implementations": sorted(set(program.implementations.values())),
    }


def describe_device(device: torch.device) -> dict:
    import transformers

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    return {
        "device": str(device), "name": name, "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(), "segcompile": _version(), "platform": platform.platform(),
    }


def describe_perplexity_texts(sequences: Mapping[int, Sequence[texts.TextSequence]], split: str) -> dict:
    """Every document used, per length, with its hash: the texts depend on the Python version."""
    return {
        "split": split,
        "sources": {texts.STDLIB: f"Python {platform.python_version()} standard library (top-level modules)",
                    texts.LICENSES: str(texts.LICENSES_DIR)},
        "one_document_per_sequence": True,
        "sequences": {str(n): [s.describe() for s in chosen] for n, chosen in sequences.items()},
    }


def describe_passkey_texts() -> dict:
    return {"instruction": passkey.INSTRUCTION, "filler": list(passkey.FILLER), "needle": passkey.NEEDLE,
            "question": passkey.QUESTION, "answer": passkey.ANSWER, "depths": list(passkey.DEPTH_RANGE)}


def without_options(argv: Sequence[str], options: set[str]) -> list[str]:
    """A command line less ``options`` (each taking one value, as ``--opt V`` or ``--opt=V``): the
    ones that decide where or for how long one run works, not what its result is, so that a
    result records the command that reproduces it and no path of the machine it ran on."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in options:
            skip = True
        elif arg.split("=")[0] not in options:
            kept.append(arg)
    return kept


def recorded_command(script: str, argv: Sequence[str], run_only: set[str]) -> str:
    """``python script argv...`` quoted for a shell, less the ``run_only`` options (``without_options``)."""
    return shlex.join(["python", script, *without_options(argv, run_only)])


def _version() -> str:
    try:
        return importlib.metadata.version("segcompile")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"
