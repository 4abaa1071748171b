"""Atomic file writes: an interrupted write never leaves a file that looks valid."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to a temporary file beside ``path``, then rename it over ``path``."""
    return _atomic_write(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | os.PathLike, data) -> Path:
    """Write ``data`` (bytes, or any buffer such as a serialized TensorRT engine) like ``atomic_write_text``."""
    return _atomic_write(path, memoryview(data))


def _atomic_write(path: str | os.PathLike, data) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the mode open() would
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
