"""What the TensorRT engine builder (``deploy.tensorrt``) and backend (``deploy.tensorrt_backend``) share:
importing ``tensorrt``, its errors, its logger, and the engine file with its record beside it.

``tensorrt`` is imported inside the functions: without it they raise ``TensorRTUnavailable``
with the install hint. An engine ``ENGINE`` goes with ``ENGINE.json``, its record: the format
(``ir.TENSORRT_FORMAT``, ``ir.TENSORRT_FORMAT_VERSION``), the exported ONNX file's ``segcompile.*``
metadata, the profile, the precision and the engine's SHA-256. A TensorRT plan carries no
metadata of ours, and a plain plan file stays loadable by TensorRT's own tools; a runner
refuses an engine whose hash is not the one recorded.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from ..errors import SegcompileError
from ..files import atomic_write_bytes, atomic_write_text
from ..ir import TENSORRT_FORMAT, TENSORRT_FORMAT_VERSION

INSTALL_HINT = 'pip install "segcompile[tensorrt]" (needs an NVIDIA GPU)'
_LOGGER = None  # one trt.Logger per process: TensorRT warns when a second, different one is passed


class TensorRTError(SegcompileError):
    """TensorRT refused the file, the build failed, or the engine cannot run what it is given."""


class TensorRTUnavailable(SegcompileError, ImportError):
    """``tensorrt`` does not import (not installed, or its libraries are missing)."""

    def __init__(self, reason: str):
        super().__init__(f"TensorRT is not available ({reason}): {INSTALL_HINT}")
        self.reason = reason


def import_tensorrt():
    """The ``tensorrt`` module, or ``TensorRTUnavailable`` with the install hint."""
    try:
        import tensorrt
    except (ImportError, OSError) as e:  # OSError: the bindings are there but libnvinfer is not
        raise TensorRTUnavailable(" ".join(str(e).split()) or type(e).__name__) from e
    return tensorrt


def missing_tensorrt() -> str | None:
    """Why ``tensorrt`` does not import here (one line, without the hint), or None when it does."""
    try:
        import_tensorrt()
    except TensorRTUnavailable as e:
        return e.reason
    return None


def logger(trt, verbose: bool = False):
    """The process's one ``trt.Logger``, showing warnings (and everything when ``verbose``)."""
    global _LOGGER
    if _LOGGER is None:
        _LOGGER = trt.Logger(trt.Logger.WARNING)
    _LOGGER.min_severity = trt.Logger.VERBOSE if verbose else trt.Logger.WARNING
    return _LOGGER


def require_gpu() -> None:
    import torch

    if not torch.cuda.is_available():
        raise TensorRTError("TensorRT builds and runs engines on an NVIDIA GPU, and torch sees none here")


# ---- the engine file and its record ---------------------------------------------------------------
def metadata_path(engine_path: str | os.PathLike) -> Path:
    """Where ``build_engine`` writes the engine's metadata: ``ENGINE.json`` beside it."""
    engine_path = Path(engine_path)
    return engine_path.with_name(engine_path.name + ".json")


def write_engine(engine_path: Path, data: memoryview, record: dict) -> None:
    """Write the serialized engine and, beside it, ``record`` with the format and the engine's hash."""
    record = {**record, "format": TENSORRT_FORMAT, "format_version": TENSORRT_FORMAT_VERSION,
              "engine_bytes": data.nbytes, "engine_sha256": hashlib.sha256(data).hexdigest()}
    # engine first: a stale metadata file beside a new engine fails the hash check, never runs it
    atomic_write_bytes(engine_path, data)
    atomic_write_text(metadata_path(engine_path), json.dumps(record, indent=1, sort_keys=True) + "\n")


def read_engine(path: Path) -> tuple[dict, bytes]:
    """The engine's metadata record and bytes, checked against each other."""
    meta_path = metadata_path(path)
    if not path.is_file():
        raise TensorRTError(f"{path}: no such file (build one with `segcompile export --format tensorrt`)")
    if not meta_path.is_file():
        raise TensorRTError(f"{meta_path}: no such file; segcompile reads an engine's segment sizes, plan and state "
                            "layout from it: build the engine with `segcompile export --format tensorrt`")
    try:
        record = json.loads(meta_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise TensorRTError(f"{meta_path} is not a segcompile engine metadata file ({e})") from None
    if not isinstance(record, dict) or record.get("format") != TENSORRT_FORMAT:
        raise TensorRTError(f"{meta_path} is not a segcompile engine metadata file")
    if record.get("format_version") != TENSORRT_FORMAT_VERSION:
        raise TensorRTError(f"{meta_path} has format version {record.get('format_version')}; this segcompile "
                            f"reads {TENSORRT_FORMAT_VERSION}")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != record.get("engine_sha256"):
        raise TensorRTError(f"{path} is not the engine {meta_path.name} describes (its SHA-256 differs: the build "
                            "was interrupted, or one file was replaced); build the engine again")
    return record, data
